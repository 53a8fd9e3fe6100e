"""Removal steps (MLP channels, heads, sub-blocks) and the executor that follows a plan."""
