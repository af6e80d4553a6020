"""Evaluating language models: in-context learning."""
