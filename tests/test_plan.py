"""mode=plan: compile-only plans for TPU topologies (libtpu on this CPU host; no TPU, nothing allocated)."""
import math

import jax
import numpy as np
import pytest

from tiny_configs import tiny_config
from v2flow_jax import build, plan
from v2flow_jax.models import tokenizer as tokenizer_lib


def _param_count(config) -> int:
    """Trainable parameters counted from the model's abstract init alone (no shardings involved)."""
    model, _ = build.build_model(config)
    shapes = jax.eval_shape(lambda: tokenizer_lib.init_variables(model, jax.random.key(0)))
    from flax import linen as nn
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def test_parse_topology():
    assert plan.parse_topology("v5e:16x16") == ("v5e:16x16", 1)
    assert plan.parse_topology("2xv5p:4x4x8") == ("v5p:4x4x8", 2)
    with pytest.raises(ValueError, match="is not a TPU topology"):
        plan.parse_topology("v5e-256")


def test_train_step_plan_matches_the_analytic_bytes_and_the_compiler():
    c = tiny_config(vocab=True, batch_size=8)
    c.plan.reconstruct = True
    row = plan.plan_topology(c, "v5e:2x2")
    assert row["devices"] == 4 and row["chip"] == "TPU v5 lite" and row["mesh"]["data"] == 4
    # Data-parallel only: every device holds all parameters, float32, twice (weights and their EMA).
    assert row["param_bytes"] == 2 * 4 * _param_count(c)
    t = row["train"]
    assert t["fits"] and t["flops"] > 0 and 0 < t["peak_bytes"] < row["hbm_bytes"]
    # The compiler's argument bytes are the state, the constants and one device's batch rows (2 images of
    # 32x32x3 float32): ours, plus the TPU's tile padding, which is large on a model this narrow (64 wide).
    ours = row["param_bytes"] + row["optimizer_bytes"] + row["frozen_bytes"] + 2 * 32 * 32 * 3 * 4
    assert ours <= t["argument_bytes"] <= 2 * ours, (ours, t["argument_bytes"])
    assert row["reconstruct"]["fits"] and row["reconstruct"]["peak_bytes"] > 0

    # fsdp over 4 chips shards the weights: fewer bytes per device, again what the compiler counts.
    c.mesh = [("data", 1), ("fsdp", 4), ("tensor", 1)]
    c.plan.reconstruct = False
    sharded = plan.plan_topology(c, "v5e:2x2")
    assert sharded["param_bytes"] < 0.5 * row["param_bytes"]
    ours = sharded["param_bytes"] + sharded["optimizer_bytes"] + sharded["frozen_bytes"] + 2 * 32 * 32 * 3 * 4
    assert ours <= sharded["train"]["argument_bytes"] <= 2 * ours
    assert sharded["train"]["argument_bytes"] < 0.6 * t["argument_bytes"]      # the compiler sees the sharding too
    table = plan.format_rows("tiny", [row, sharded])
    assert "| v5e:2x2 | 4 | data4 |" in table and "| yes |" in table


def test_an_over_hbm_program_is_reported_not_raised():
    c = tiny_config(vocab=False, **{"model.velocity_width": 16384, "model.velocity_depth": 4})
    c.plan.reconstruct = False
    row = plan.plan_topology(c, "v5e:2x2")
    assert not row["train"]["fits"]
    assert row["param_bytes"] > row["hbm_bytes"]          # the weights alone are ~46 GiB a chip
    assert "HBM" in row["train"]["message"]
    assert "does not fit" in plan.format_rows("big", [row])


def test_two_slices_put_the_dcn_axis_across_slices():
    c = tiny_config(vocab=False, batch_size=8)
    c.mesh = [("data", -1), ("fsdp", 2), ("tensor", 1)]
    devices = plan.topology_devices("2xv5e:2x2")
    run = plan.abstract_run(c, devices)
    grid = run.mesh.devices           # (data, fsdp, tensor) = (4, 2, 1)
    assert grid.shape == (4, 2, 1)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # Each fsdp group sits inside one slice (ICI); data rows 0-1 on one slice, 2-3 on the other.
    assert (slice_of == slice_of[:, :1, :]).all()
    assert sorted(set(slice_of[:2].ravel())) != sorted(set(slice_of[2:].ravel()))


def test_llm_stage_plan_counts_the_extended_llama():
    from v2flow_jax import config_defaults
    c = config_defaults.base_config()
    c.mesh = [("data", 1), ("fsdp", 4), ("tensor", 1)]
    c.llm.update(batch_size=8, seq_len=16, dtype="bfloat16", scan_layers=True)
    shape = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    c.plan.update(stage="llm", llm=shape, llm_visual_codes=26)
    row = plan.plan_llm_topology(c, "v5e:2x2")
    vocab, d, f, kv = 100 + 26 + 2, 64, 128, 2 * 16
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d       # q, o, k, v, the MLP, two norms
    count = 2 * vocab * d + 2 * per_layer + d                      # embedding, untied head, final norm
    assert row["param_bytes"] == 4 * count / 4                     # float32, every weight split over fsdp 4
    # Adam's two moments, split like the weights (replicated they would be 8x), and a step count
    assert 2 * row["param_bytes"] <= row["optimizer_bytes"] <= 2 * row["param_bytes"] + 64
    assert row["train"]["fits"] and row["train"]["flops"] > 0 and row["sequence"] == 16
