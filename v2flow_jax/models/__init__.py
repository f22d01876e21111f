"""Flax linen modules of the V2Flow tokenizer."""
