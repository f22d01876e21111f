"""V2Flow in JAX/Flax: visual tokens in an LLM's vocabulary space, rebuilt by masked AR rectified flow."""

__version__ = "0.1.0"
