"""The language model of the LLM stage: LLaMA in Flax linen (`llama.py`); loaders in `v2flow_jax/convert/`."""
