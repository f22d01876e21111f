"""Tests run on CPU with 8 virtual devices so every sharding path is exercised."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from v2flow_jax import host_memory  # noqa: E402

host_memory.apply_default()   # as `main` does (importing v2flow_jax alone changes nothing)
