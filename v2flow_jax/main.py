"""Entry point: `python -m v2flow_jax.main --config=configs/tok256.py --workdir=/path/to/run`.

Without --config it runs the embedded CPU demo (configs/tok256.py:demo). `config.mode` picks the job:
train (resumes from --workdir), evaluate (the latest checkpoint), params (print the parameter table
and exit), cache_latents (encode a dataset once into array_record shards), encode_pairs (a
text-image pairs JSONL into token-id records for the LLM stage, lm/token_records.py), finetune_llm
(extend an LLM with a trained tokenizer's codes and fine-tune it on those records, lm/finetune_run.py),
generate_images (prompts -> PNGs and a grid from a fine-tuned export, lm/t2i.py), evaluate_t2i
(greedy generations against the true images and the tokenizer's own reconstructions, lm/t2i_eval.py).
"""
from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_config.py")
try:
    config_flags.DEFINE_config_file("config", DEMO_CONFIG, "Config file (configs/*.py[:arg]); default: the CPU demo.",
                                    lock_config=True)
except (AttributeError, KeyError) as e:
    # ml_collections applies the command line's --config.<field> overrides here, and a field the config
    # lacks surfaces as a bare AttributeError three tracebacks deep.
    import sys
    overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
    raise SystemExit(f"FATAL: one of {' '.join(overrides) or 'the --config.<field> overrides'} names a field the "
                     f"config does not have ({e}); every field and its default is in v2flow_jax/config_defaults.py (and the "
                     "model's in models/tokenizer.py TokenizerConfig).") from None
flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints, metrics.json, grids and TensorBoard events.")
flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first (multi-host pods and clusters; "
                  "on Cloud TPU and SLURM it finds its peers itself, elsewhere give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --jax_distributed (or "
                    "$JAX_COORDINATOR_ADDRESS); needed where JAX cannot detect the cluster.")
flags.DEFINE_integer("num_processes", None, "Number of JAX processes, with --jax_distributed.")
flags.DEFINE_integer("process_id", None, "This process's index (0 .. num_processes-1), with --jax_distributed.")


# config.mode -> (module, function(config, workdir)); imported only when chosen (the LLM stage needs
# transformers, the tokenizer's modes do not).
JOBS = {
    "train": ("v2flow_jax.train", "train_and_evaluate"),
    "evaluate": ("v2flow_jax.api", "evaluate_checkpoint"),
    "plan": ("v2flow_jax.plan", "run"),
    "cache_latents": ("v2flow_jax.cache_latents", "run"),
    "encode_pairs": ("v2flow_jax.lm.token_records", "run"),
    "finetune_llm": ("v2flow_jax.lm.finetune_run", "run"),
    "generate_images": ("v2flow_jax.lm.t2i", "run"),
    "evaluate_t2i": ("v2flow_jax.lm.t2i_eval", "run"),
}


def _quiet_orbax():
    """orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""
    import logging as py_logging

    class _Filter(py_logging.Filter):
        def filter(self, record):
            return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname
    logging.get_absl_handler().addFilter(_Filter())


def main(argv):
    del argv
    _quiet_orbax()
    import jax
    from v2flow_jax import config_defaults

    if flags.FLAGS.jax_distributed:
        jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                                   num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id)

    config = flags.FLAGS.config
    if flags.FLAGS["config"].value is not None and flags.FLAGS["config"].using_default_value:
        logging.info("No --config given: running the embedded CPU demo (configs/tok256.py:demo).")
    workdir = flags.FLAGS.workdir
    logging.info("JAX %s, %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)

    if config.mode == "params":
        from v2flow_jax import summary
        print(summary.parameter_table(config))
        return
    if config.mode not in JOBS:
        raise ValueError(f"config.mode={config.mode!r} is not one of {config_defaults.MODES}.")
    os.makedirs(workdir, exist_ok=True)
    module, function = JOBS[config.mode]
    result = getattr(importlib.import_module(module), function)(config, workdir)
    logging.info("Done: %s", result)


if __name__ == "__main__":
    from v2flow_jax import host_memory
    host_memory.apply_default()    # before the first computation (host_memory.py); V2FLOW_RETAIN_HOST_MEMORY=0: off
    app.run(main)
