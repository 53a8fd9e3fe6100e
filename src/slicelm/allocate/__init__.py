"""Deciding: exact parameter counts, budgets and the allocators that turn them into plans."""
