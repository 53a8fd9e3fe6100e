"""Measuring models: perplexity, zero-shot evaluation, sweeps and their plots."""
