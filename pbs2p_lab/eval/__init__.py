"""Evaluation: held-out perplexity, offline zero-shot tasks via lm-eval, and result records."""
