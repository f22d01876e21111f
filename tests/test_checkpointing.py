"""Checkpointer: sharded round trip onto another mesh, data/config, keep-N, crash leftovers, errors, and the
data-iterator state (grain's orbax handler; asynchronous saves; checkpoints in the format written before it)."""
import json
import os
import threading

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
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


def _dataset_iter():
    return iter(grain.MapDataset.range(100).to_iter_dataset())      # a grain DatasetIterator: dict states


def test_round_trip_onto_another_mesh_with_data_and_config(tmp_path):
    state = _state(_mesh_222())
    it = iter(_data_loader())                            # grain DataLoaderIterator: JSON as bytes
    next(it)
    data_state = it.get_state()
    config = ml_collections.ConfigDict({"model": {"width": 8}, "lr": 1e-3, "mesh": [("data", 2)]})

    host_copy = jax.tree.map(np.asarray, state)

    with checkpointing.Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, data_iterator=it, config=config)
        expected_next = next(it)                         # the iterator moves on; the checkpoint does not
        # The asynchronous save has its own host copy: the trainer may donate its buffers now.
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        assert not ckpt.save(10, host_copy, force=True)  # already there: a no-op, not an error

    mesh = _mesh_811()
    abstract = _abstract(host_copy, mesh, _specs_811())
    ckpt = checkpointing.Checkpointer(tmp_path)
    it2 = iter(_data_loader())
    restored, data_restored, config_back = ckpt.restore(abstract_state=abstract, data_iterator=it2)
    ckpt.close()

    for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(host_copy), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == target.sharding
        assert got.dtype == want.dtype
    assert isinstance(restored["opt"], tuple)
    key = checkpointing.key_from_data(restored["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(1)))

    assert data_restored and it2.get_state() == data_state
    np.testing.assert_array_equal(next(it2), expected_next)
    data_file = tmp_path / "checkpoints" / "10" / "data" / "process_0-of-1.json"
    assert data_file.read_bytes() == data_state          # grain's own format: the state's text
    assert config_back == json.loads(config.to_json_best_effort())
    saved_config = tmp_path / "checkpoints" / "10" / "config" / checkpointing.CONFIG_FILENAME
    assert json.loads(saved_config.read_text())["model"]["width"] == 8


def test_interval_keep_last_n_and_dataset_iterator_state(tmp_path):
    mesh = _mesh_222()
    it = _dataset_iter()
    with checkpointing.Checkpointer(tmp_path, keep=2, save_interval_steps=2, async_save=False) as ckpt:
        written = []
        for s in range(1, 7):
            assert next(it) == s - 1
            written.append(ckpt.save(s, _state(mesh, scale=s), data_iterator=it))
        assert written == [False, True, False, True, False, True]
        next(it)
        assert ckpt.save(7, _state(mesh, scale=7), data_iterator=it, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        fresh = _dataset_iter()
        restored, data_restored, config = ckpt.restore(6, abstract_state=_state(mesh), data_iterator=fresh)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "7"]
    assert data_restored and config is None
    assert fresh.get_state() == {"next_index": 6} and next(fresh) == 6
    np.testing.assert_array_equal(restored["params"]["b"], np.full(4, 6.0, np.float32))
    saved = json.loads((tmp_path / "checkpoints" / "6" / "data" / "process_0-of-1.json").read_text())
    assert saved == {"next_index": 6}


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


class _Recording:
    """An iterator that delegates to a grain one (as input_pipeline.DataIterator does), noting which
    thread reads its state."""

    def __init__(self, inner):
        self._inner, self.state_reads = inner, []

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._inner)

    def get_state(self):
        self.state_reads.append(threading.current_thread())
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)

    def start_prefetch(self):
        self._inner.start_prefetch()


def test_async_save_captures_the_position_at_save_time(tmp_path):
    """orbax runs grain's (not asynchronous) handler in a worker thread; the position is still the one at
    `save`: advancing the iterator right after (while the write may run) changes nothing in the checkpoint."""
    it = _Recording(iter(_data_loader()))
    reference = [np.asarray(b) for b in iter(_data_loader())]
    k = 3
    with checkpointing.Checkpointer(tmp_path, async_save=True) as ckpt:
        for _ in range(k):
            next(it)
        assert ckpt.save(k, {"x": jnp.ones(3)}, data_iterator=it, force=True)
        assert it.state_reads == [threading.main_thread()]   # read once, in the caller's thread, during save
        for _ in range(3):                                   # at once, before the write is known to be done
            next(it)
        ckpt.wait()
    assert len(it.state_reads) == 1
    fresh = _Recording(iter(_data_loader()))
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        _, data_restored, _ = ckpt.restore(k, abstract_state={"x": jnp.ones(3)}, data_iterator=fresh)
    assert data_restored
    rest = [np.asarray(b) for b in fresh]
    assert len(rest) == len(reference) - k
    for got, want in zip(rest, reference[k:]):
        np.testing.assert_array_equal(got, want)


def _write_legacy_checkpoint(tmp_path, step, record):
    """A checkpoint as this module wrote it before grain's handler: the iterator state wrapped in a
    {"kind": ...} record by a JsonCheckpointHandler (the same orbax items and file name)."""
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(),
        data=ocp.JsonCheckpointHandler(filename="process_0-of-1.json",
                                       multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
        config=ocp.JsonCheckpointHandler(filename=checkpointing.CONFIG_FILENAME))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "checkpoints", options=options, handler_registry=registry) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": jnp.full(3, float(step))}),
                                                   data=ocp.args.JsonSave(record),
                                                   config=ocp.args.JsonSave({"width": 8})))


def test_checkpoints_in_the_previous_data_format_still_restore(tmp_path):
    loader_it = iter(_data_loader())
    next(loader_it), next(loader_it)
    loader_state = loader_it.get_state()
    _write_legacy_checkpoint(tmp_path, 1, {"kind": "bytes", "text": loader_state.decode("utf-8")})
    _write_legacy_checkpoint(tmp_path, 2, {"kind": "json", "value": {"next_index": 5}})
    abstract = {"x": jnp.zeros(3)}
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        fresh = iter(_data_loader())
        state, data_restored, config = ckpt.restore(1, abstract_state=abstract, data_iterator=fresh)
        assert data_restored and config == {"width": 8}
        np.testing.assert_array_equal(state["x"], np.full(3, 1.0))
        np.testing.assert_array_equal(next(fresh), next(loader_it))
        ds_it = _dataset_iter()
        step, _, data_restored, _ = ckpt.restore_latest(abstract_state=abstract, data_iterator=ds_it)
        assert step == 2 and data_restored and next(ds_it) == 5
        # and the next save, on top of the old steps, is in grain's format
        assert ckpt.save(3, {"x": jnp.full(3, 3.0)}, data_iterator=ds_it, force=True)
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ds_it = _dataset_iter()
        assert ckpt.restore_latest(abstract_state=abstract, data_iterator=ds_it)[0] == 3
        assert next(ds_it) == 6


def test_data_state_errors(tmp_path):
    """Another number of processes and changed data are mismatches (raised, the step left in place);
    restore_data=False still restores the model; an unreadable data file is damage (set aside)."""
    abstract = {"x": jnp.zeros(3)}
    with checkpointing.Checkpointer(tmp_path, keep=5, async_save=False) as ckpt:
        it = _dataset_iter()
        for step in (1, 2, 3):
            next(it)
            ckpt.save(step, {"x": jnp.full(3, float(step))}, data_iterator=it, force=True)
        with pytest.raises(TypeError, match="needs bytes"):
            ckpt.save(4, abstract, data_iterator=_Recording(it), force=True)   # a dict state, not a DatasetIterator
        with pytest.raises(TypeError, match="start_prefetch"):
            ckpt.save(4, abstract, data_iterator=iter([1, 2]), force=True)
    data_dir = tmp_path / "checkpoints" / "3" / "data"
    saved = (data_dir / "process_0-of-1.json").read_text()
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    (data_dir / "process_1-of-2.json").write_text(saved)
    (tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json").write_bytes(b"\0" * len(saved))

    with checkpointing.Checkpointer(tmp_path, keep=5) as ckpt:
        fresh = _dataset_iter()
        with pytest.raises(checkpointing.CheckpointMismatchError, match="different number of processes") as err:
            ckpt.restore_latest(abstract_state=abstract, data_iterator=fresh)
        assert "restore_data=False" in str(err.value) and "process_1-of-2.json" in str(err.value)
        assert ckpt.all_steps() == [1, 2, 3] and fresh.get_state() == {"next_index": 0}
        step, state, data_restored, _ = ckpt.restore_latest(abstract_state=abstract, data_iterator=fresh,
                                                            restore_data=False)
        assert (step, data_restored) == (3, False) and fresh.get_state() == {"next_index": 0}
        np.testing.assert_array_equal(state["x"], np.full(3, 3.0))

        import shutil
        shutil.rmtree(tmp_path / "checkpoints" / "3")
        ckpt._manager.reload()
        step, _, data_restored, _ = ckpt.restore_latest(abstract_state=abstract, data_iterator=fresh)
        assert (step, data_restored) == (1, True) and next(fresh) == 1       # step 2's zeroed file: damage
        assert ckpt.all_steps() == [1]
        assert "not JSON" in (tmp_path / "checkpoints_damaged" / "2" / "DAMAGED.txt").read_text()

        with pytest.raises(TypeError, match="has no get_state"):
            ckpt.restore_latest(abstract_state=abstract, data_iterator=iter([1, 2]))
        assert ckpt.all_steps() == [1]                                  # a wrong argument is not damage
        with pytest.raises(checkpointing.DataStateMismatchError, match="refuses") as err:
            ckpt.restore(1, abstract_state=abstract, data_iterator=iter(_data_loader()))   # another pipeline
        assert err.value.step == 1 and ckpt.all_steps() == [1]


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
