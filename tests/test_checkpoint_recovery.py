"""A damaged newest checkpoint (each kind of damage a crash or a full disk leaves) falls back to the
newest intact step, which is restored; the damaged step is kept aside, never deleted."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from v2flow_jax import checkpointing, sharding


def _state(step):
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
    rep = NamedSharding(mesh, P())
    return {"w": jax.device_put(jnp.full((16, 16), float(step)), rep),
            "step": jax.device_put(jnp.int32(step), rep)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _data_files(step_dir):
    """The array data files of a step (what a truncated write or a zero-filled disk block hits)."""
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep
                or os.path.basename(root) == "d"]
    return sorted(out)


def _remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _truncate(step_dir):
    for path in _data_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(max(os.path.getsize(path) // 3, 1))


def _zero_fill(step_dir):
    for path in _data_files(step_dir):
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"\0" * size)


def _empty_folder(step_dir):
    import shutil
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.parametrize("damage", [_remove_metadata, _truncate, _zero_fill, _empty_folder],
                         ids=["missing_metadata", "truncated_data", "zero_filled_data", "empty_step_folder"])
def test_damaged_latest_step_falls_back_to_the_newest_intact_one(tmp_path, damage):
    with checkpointing.Checkpointer(tmp_path, keep=5, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), force=True)
    step_dir = os.path.join(tmp_path, "checkpoints", "3")
    assert _data_files(step_dir), "the test needs data files to damage"
    damage(step_dir)
    files_before = sorted(os.listdir(step_dir))

    with checkpointing.Checkpointer(tmp_path, keep=5) as ckpt:
        step, state, _, _ = ckpt.restore_latest(abstract_state=_abstract(_state(0)))
        assert step == 2
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full((16, 16), 2.0))
        assert ckpt.all_steps() == [1, 2]
        # A new save at the damaged step's number is possible again: the run continues.
        assert ckpt.save(3, _state(3), force=True)
    kept = os.path.join(tmp_path, "checkpoints_damaged", "3")
    assert sorted(set(os.listdir(kept)) - {"DAMAGED.txt"}) == files_before   # nothing deleted
    assert "step 3" in open(os.path.join(kept, "DAMAGED.txt")).read()


def test_a_config_mismatch_is_not_damage(tmp_path):
    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _state(1), force=True)
    wrong = _abstract(_state(0))
    wrong["w"] = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=wrong["w"].sharding)
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpointing.CheckpointMismatchError, match="w: saved shape"):
            ckpt.restore_latest(abstract_state=wrong)
        assert ckpt.all_steps() == [1]                      # left in place
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints_damaged"))


def test_all_steps_damaged_means_a_fresh_start(tmp_path):
    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _state(1), force=True)
    _zero_fill(os.path.join(tmp_path, "checkpoints", "1"))
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract_state=_abstract(_state(0))) is None
        assert ckpt.latest_step() is None
