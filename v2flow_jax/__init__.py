"""V2Flow in JAX/Flax: visual tokens in an LLM's vocabulary space, rebuilt by masked AR rectified flow."""

__version__ = "0.1.0"

# Importing the package changes nothing in the process. `python -m v2flow_jax.main` (and the benchmarks)
# call host_memory.apply_default() first; API users on CPU can do the same before their first computation.
