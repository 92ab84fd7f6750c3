"""Measuring a model: passkey retrieval over long contexts (`passkey`)."""
