"""Evaluation: behaviour (judges) and fluency (perplexity) metrics."""
