"""Measuring a model: the log-probability of given text (`scoring`), perplexity and bits per byte (`perplexity`)."""
