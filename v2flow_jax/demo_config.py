"""The embedded default config of `python -m v2flow_jax.main`: the CPU demo (= configs/tok256.py:demo).

A file inside the package so the default works from an installed wheel and accepts --config.x=...
overrides like any config file.
"""
from v2flow_jax import config_defaults


def get_config(arg: str = ""):
    del arg
    return config_defaults.demo_config()
