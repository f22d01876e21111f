"""Checkpointer: sharded round trip onto another mesh, data/config, keep-N, crash leftovers, errors."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from v2flow_jax import checkpointing, sharding


def _mesh_222():
    return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


def _mesh_811():
    return sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])


def _state(mesh, scale=1.0):
    """A small train-state-like tree: params, optimizer moments (a tuple), step, rng key data."""
    def put(x, spec):
        return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
    w = np.arange(64, dtype=np.float32).reshape(8, 8) * scale
    return {
        "params": {"w": put(w, P("fsdp", "tensor")), "b": put(np.ones(4, np.float32) * scale, P())},
        "opt": ({"mu": put(w * 0.5, P(None, ("data", "fsdp")))}, put(np.int32(3), P())),
        "step": put(np.int32(7), P()),
        "rng": put(checkpointing.key_to_data(jax.random.key(1)), P()),
    }


def _abstract(state, mesh, specs):
    """The same shapes/dtypes, targeted at `mesh` with the given per-leaf specs."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        state, specs)


def _specs_811():
    return {"params": {"w": P("data"), "b": P()}, "opt": ({"mu": P(None, "data")}, P()),
            "step": P(), "rng": P()}


def _data_loader():
    sampler = grain.samplers.IndexSampler(32, shuffle=True, seed=0, num_epochs=1,
                                          shard_options=grain.sharding.NoSharding())
    return grain.DataLoader(data_source=grain.sources.RangeDataSource(0, 32, 1), sampler=sampler,
                            operations=[grain.transforms.Batch(4)], worker_count=0)


def test_round_trip_onto_another_mesh_with_data_and_config(tmp_path):
    state = _state(_mesh_222())
    it = iter(_data_loader())
    next(it)
    data_state = it.get_state()                          # grain DataLoader: JSON as bytes
    expected_next = next(it)
    config = ml_collections.ConfigDict({"model": {"width": 8}, "lr": 1e-3, "mesh": [("data", 2)]})

    host_copy = jax.tree.map(np.asarray, state)

    with checkpointing.Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, data_state=data_state, config=config)
        # The asynchronous save has its own host copy: the trainer may donate its buffers now.
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        assert not ckpt.save(10, host_copy, force=True)  # already there: a no-op, not an error

    mesh = _mesh_811()
    abstract = _abstract(host_copy, mesh, _specs_811())
    ckpt = checkpointing.Checkpointer(tmp_path)
    restored, data_back, config_back = ckpt.restore(abstract_state=abstract)
    ckpt.close()

    for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(host_copy), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == target.sharding
        assert got.dtype == want.dtype
    assert isinstance(restored["opt"], tuple)
    key = checkpointing.key_from_data(restored["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(1)))

    assert data_back == data_state
    it2 = iter(_data_loader())
    it2.set_state(data_back)
    np.testing.assert_array_equal(next(it2), expected_next)
    assert config_back == json.loads(config.to_json_best_effort())
    saved_config = tmp_path / "checkpoints" / "10" / "config" / checkpointing.CONFIG_FILENAME
    assert json.loads(saved_config.read_text())["model"]["width"] == 8


def test_interval_keep_last_n_and_dict_data_state(tmp_path):
    mesh = _mesh_222()
    with checkpointing.Checkpointer(tmp_path, keep=2, save_interval_steps=2, async_save=False) as ckpt:
        written = [ckpt.save(s, _state(mesh, scale=s), data_state={"next_index": s}) for s in range(1, 7)]
        assert written == [False, True, False, True, False, True]
        assert ckpt.save(7, _state(mesh, scale=7), data_state={"next_index": 7}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        restored, data_state, config = ckpt.restore(6, abstract_state=_state(mesh))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "7"]
    assert data_state == {"next_index": 6} and config is None
    np.testing.assert_array_equal(restored["params"]["b"], np.full(4, 6.0, np.float32))


def test_unfinished_save_is_never_picked_up(tmp_path):
    mesh = _mesh_222()
    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, _state(mesh))
    # A process killed mid-save leaves orbax's temporary directory behind (local filesystems:
    # `<step>.orbax-checkpoint-tmp...`, renamed to `<step>` only once complete).
    root = tmp_path / "checkpoints"
    for name in ("9.orbax-checkpoint-tmp", "12.orbax-checkpoint-tmp-1712345678"):
        (root / name / "state").mkdir(parents=True)
        (root / name / "state" / "partial").write_bytes(b"\0" * 10)

    reader = checkpointing.Checkpointer(tmp_path, read_only=True)
    assert reader.latest_step() == 5
    assert (root / "9.orbax-checkpoint-tmp").exists()            # a reader never cleans up
    with pytest.raises(FileNotFoundError, match="step 9"):
        reader.restore(9, abstract_state=_state(mesh))
    reader.close()

    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 5
        restored, _, _ = ckpt.restore(abstract_state=_state(mesh))
        np.testing.assert_array_equal(restored["step"], 7)
        assert ckpt.save(9, _state(mesh))                        # the same step saves cleanly
        assert ckpt.latest_step() == 9
    assert not any("tmp" in p.name for p in root.iterdir())      # leftovers were removed


def test_empty_workdir_missing_sharding_and_typed_keys(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    ckpt = checkpointing.Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        ckpt.restore(abstract_state={})
    ckpt.save(1, {"x": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\['x'\] has no sharding"):
        ckpt.restore(1, abstract_state={"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(TypeError, match=r"\['rng'\] is a typed jax.random key.*key_to_data"):
        ckpt.save(2, {"rng": jax.random.key(0)})
    ckpt.close()
    assert checkpointing.Checkpointer(tmp_path / "never_written", read_only=True).latest_step() is None


def test_shape_mismatch_names_the_leaf_and_the_config(tmp_path):
    mesh = _mesh_222()
    state = _state(mesh)
    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, config={"width": 8})
        wrong = dict(state, params={"w": jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                                              sharding=NamedSharding(mesh, P())),
                                    "b": state["params"]["b"], "extra": state["params"]["b"]})
        with pytest.raises(ValueError) as err:
            ckpt.restore(3, abstract_state=wrong)
    msg = str(err.value)
    assert "params/w: saved shape (8, 8), expected (16, 8)" in msg
    assert "params/extra: expected but not in the checkpoint" in msg
    assert os.path.join("checkpoints", "3", "config", "config.json") in msg
    assert "config" in msg and "fresh --workdir" in msg


def test_data_state_encoding_round_trips():
    for state in (b'{"a": 1}', b"\xff\x00binary", "text", {"next_index": 3, "nested": [1, 2]}):
        record = checkpointing.encode_data_state(state)
        assert checkpointing.decode_data_state(json.loads(json.dumps(record))) == state
    with pytest.raises(TypeError, match="data_state"):
        checkpointing.encode_data_state({"x": object()})


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """The README's --workdir=runs/demo is relative; orbax itself only accepts absolute paths."""
    import jax.numpy as jnp
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    ckpt = checkpointing.Checkpointer("runs/demo", keep=2, async_save=True)
    assert ckpt.save(1, state, force=True)
    ckpt.close()
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "1").is_dir()
    reader = checkpointing.Checkpointer("runs/demo", read_only=True)
    assert reader.latest_step() == 1
    restored, _, _ = reader.restore(1, abstract_state=state)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
