"""V2Flow in JAX/Flax: visual tokens in an LLM's vocabulary space, rebuilt by masked AR rectified flow."""
from v2flow_jax import host_memory as _host_memory

__version__ = "0.1.0"

# On CPU, keep freed host memory for reuse so each step does not page-fault its buffers in again
# (host_memory.py; V2FLOW_RETAIN_HOST_MEMORY=0 turns it off). Must run before the first computation.
_host_memory.apply_default()
