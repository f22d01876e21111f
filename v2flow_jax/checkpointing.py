"""Checkpoints of the training run: sharded state + data-iterator state + config, with auto-resume.

Layout (one directory per step, written by orbax under a temporary name and renamed when complete):

    <workdir>/checkpoints/<step>/
        state/    the train-state pytree (params, optimizer state, EMA, VQ statistics, step, rng data)
        data/     process_<i>-of-<n>.json: each process's data-iterator state, written by grain's own
                  orbax handler (grain.checkpoint.CheckpointHandler): the text of the iterator's
                  get_state() (a DataLoaderIterator's JSON bytes; a DatasetIterator's dict as JSON).
                  Checkpoints written before that hold {"kind": "bytes"|"str"|"json", ...} there;
                  they still restore.
        config/   config.json: the config of the run that wrote the checkpoint

Usage in a trainer (every process calls every method; orbax synchronises them):

    ckpt = Checkpointer(workdir, keep=3, save_interval_steps=config.ckpt_every)
    if (step := ckpt.latest_step()) is not None:
        # train_iter is restored in place; data_restored says whether the checkpoint had its position.
        state, data_restored, _ = ckpt.restore(step, abstract_state=abstract_state,
                                               data_iterator=train_iter)
    ...
    ckpt.save(step, state, data_iterator=train_iter, config=config)   # position taken here, now
    ...
    ckpt.save(final_step, state, data_iterator=train_iter, config=config, force=True)
    ckpt.close()   # waits for the asynchronous write
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"
CONFIG_FILENAME = "config.json"
DAMAGED_DIR = "checkpoints_damaged"   # beside checkpoints/: steps that failed to restore, kept for inspection
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A sound checkpoint that does not fit the state being restored (the config changed)."""


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step whose files are missing, truncated or unreadable."""


class DataStateMismatchError(CheckpointMismatchError):
    """A sound data-iterator state that the iterator being restored refuses (the data changed).

    `step` is the checkpoint's step and `config` its saved config dict (None if it has none), so a
    trainer can say what changed.
    """

    def __init__(self, message: str, *, step: int, config: dict | None):
        super().__init__(message)
        self.step = step
        self.config = config


# ----------------------------------------------------------------------------------------- rng keys

def key_to_data(key: jax.Array) -> jax.Array:
    """The uint32 words of a typed `jax.random.key` (legacy uint32 keys pass through).

    Checkpoints hold plain arrays; a typed key is not one.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def key_from_data(data: jax.Array, impl: str | None = None) -> jax.Array:
    """Inverse of `key_to_data`: a typed key from its uint32 words (`impl` None = jax's default)."""
    return jax.random.wrap_key_data(data, impl=impl)


# ------------------------------------------------------------------------- small pure conversions

def config_to_dict(config: Any) -> dict:
    """A JSON-able dict of an ml_collections config (or of a plain mapping)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, Mapping):
        # default=str: a stray non-JSON value (a dtype, a callable) is recorded, not fatal.
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"config must be an ml_collections.ConfigDict or a mapping, got {type(config)}.")


def _check_iterator(iterator: Any) -> None:
    for method in ("get_state", "set_state", "start_prefetch"):
        if not callable(getattr(iterator, method, None)):
            raise TypeError(f"data_iterator must have get_state(), set_state() and start_prefetch() (a grain "
                            f"DataLoaderIterator or DatasetIterator); {type(iterator).__name__} has no {method}().")


class _StateSnapshot:
    """The iterator's state taken in the caller's thread at `save` time, for grain's handler.

    orbax 0.12.8 runs a handler that is not an AsyncCheckpointHandler (grain's is not) in a worker thread
    (`asyncio.to_thread`) and blocks `save` until it is done, so even the iterator itself would be read
    before `save` returns; the snapshot keeps that true whatever thread or moment a later orbax picks,
    and keeps the iterator out of other threads. It is given as grain's non-DatasetIterator kind
    (`get_state()` -> bytes), which grain's handler writes as that text.
    """

    def __init__(self, iterator: Any):
        _check_iterator(iterator)
        state = iterator.get_state()
        if isinstance(iterator, grain.DatasetIterator):   # what grain's handler would write for it
            try:
                state = json.dumps(state, indent=4).encode("utf-8")
            except (TypeError, ValueError) as e:
                raise TypeError(f"{type(iterator).__name__}.get_state() is not JSON-serialisable: {e}") from e
        elif not isinstance(state, bytes):
            raise TypeError(f"{type(iterator).__name__}.get_state() returned {type(state).__name__}; grain's "
                            "checkpoint handler needs bytes (as a DataLoaderIterator's) unless the iterator is "
                            "a grain DatasetIterator.")
        try:
            state.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TypeError(f"{type(iterator).__name__}.get_state() is not UTF-8 text: {e}") from e
        self._state = state

    def get_state(self) -> bytes:
        return self._state


_LEGACY_KINDS = {"bytes": ({"kind", "text"}, {"kind", "base64"}), "str": ({"kind", "text"},),
                 "json": ({"kind", "value"},)}


def _legacy_data_state(record: Any) -> tuple[bool, Any]:
    """(True, state) for a data file in the format this module wrote before grain's handler, else (False, None).

    That format wrapped get_state() as {"kind": "bytes", "text"|"base64": ...}, {"kind": "str", "text": ...}
    or {"kind": "json", "value": ...}; neither grain's DataLoaderIterator state nor a DatasetIterator state
    of ours is a dict of exactly those keys.
    """
    if not isinstance(record, dict) or set(record) not in _LEGACY_KINDS.get(record.get("kind"), ()):
        return False, None
    if record["kind"] == "bytes":
        if "base64" in record:
            return True, base64.b64decode(record["base64"])
        return True, record["text"].encode("utf-8")
    if record["kind"] == "str":
        return True, record["text"]
    return True, record["value"]


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _is_typed_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _reject_typed_keys(tree, what: str) -> None:
    """orbax writes a typed key as bare uint32 words that then fail to restore as a key: be explicit."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_typed_key(leaf):
            raise TypeError(
                f"{what} leaf {jax.tree_util.keystr(path)} is a typed jax.random key; store "
                "checkpointing.key_to_data(key) and rebuild it with key_from_data(data).")


def _as_abstract(path, leaf):
    """A ShapeDtypeStruct with a sharding for every leaf of the restore target."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if getattr(leaf, "sharding", None) is None:
        raise ValueError(
            f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; build the target with "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) so arrays are "
            "restored straight onto the mesh.")
    return leaf


def _flat_shapes(tree) -> dict[tuple, tuple]:
    """{path: shape} in orbax's own key naming (dict keys, sequence indices as strings)."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
    return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def describe_mismatch(saved: Mapping[tuple, tuple], expected: Mapping[tuple, tuple]) -> list[str]:
    """Human-readable differences between two {path: shape} maps; empty when they agree."""
    lines = []
    for path in sorted(expected.keys() & saved.keys()):
        if tuple(saved[path]) != tuple(expected[path]):
            lines.append(f"  {_path_str(path)}: saved shape {tuple(saved[path])}, "
                         f"expected {tuple(expected[path])}")
    lines += [f"  {_path_str(p)}: expected but not in the checkpoint"
              for p in sorted(expected.keys() - saved.keys())]
    lines += [f"  {_path_str(p)}: in the checkpoint but not expected"
              for p in sorted(saved.keys() - expected.keys())]
    if len(lines) > _MAX_LISTED:
        lines = lines[:_MAX_LISTED] + [f"  ... and {len(lines) - _MAX_LISTED} more"]
    return lines


# ------------------------------------------------------------------------------------ Checkpointer

class Checkpointer:
    """Saves and restores `workdir/checkpoints/<step>/{state,data,config}` with orbax.

    Args:
      workdir: the run's directory (local path or gs://...).
      keep: how many of the most recent checkpoints to keep.
      save_interval_steps: `save` writes only at multiples of this (unless `force=True`).
      async_save: write in a background thread; `save` returns once the arrays are on the host,
        so the caller may donate/overwrite its buffers right away. Call `wait()`/`close()` before exit.
      read_only: for evaluators watching a trainer's workdir: never writes, deletes or cleans up
        (a writable Checkpointer removes unfinished temporary directories at start-up, which would
        break a trainer writing at that moment), and re-lists the directory on `latest_step()`.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        workdir = os.fspath(workdir)
        if "://" not in workdir:  # orbax's tensorstore paths must be absolute; --workdir=runs/demo is not
            workdir = os.path.abspath(workdir)
        self._directory = epath.Path(workdir) / "checkpoints"
        self._interval = int(save_interval_steps)
        self._read_only = read_only
        # Each process keeps its own iterator state, so every process writes its own file (grain's
        # handler names it so); the config is written once, by the primary process.
        self._data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        registry = ocp.handlers.create_default_handler_registry(**{
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(filename=CONFIG_FILENAME),
        })
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=1,            # the interval is applied in `save` (see force).
            create=not read_only,
            # A process killed mid-save leaves `<step>.orbax-checkpoint-tmp*`; it is never listed
            # as a step, and a writable manager removes it.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options,
                                              handler_registry=registry)

    # -------------------------------------------------------------------------------- queries
    @property
    def directory(self) -> epath.Path:
        return self._directory

    def step_dir(self, step: int) -> epath.Path:
        return self._directory / str(int(step))

    def all_steps(self) -> list[int]:
        """Finished checkpoints, oldest first (an asynchronous save still in flight is left out)."""
        if self._read_only:
            self._manager.reload()
        # orbax lists a step as soon as its save starts; only a renamed (finalized) directory
        # is complete.
        return sorted(s for s in self._manager.all_steps()
                      if ocp.utils.is_checkpoint_finalized(self.step_dir(s)))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ----------------------------------------------------------------------------------- save
    def due(self, step: int) -> bool:
        """Whether `save` would write at `step` without force (lets callers skip building its inputs)."""
        return int(step) % self._interval == 0

    def save(self, step: int, state: Any, data_iterator: Any = None, config: Any = None,
             force: bool = False) -> bool:
        """Writes a checkpoint at `step` if it falls on the interval (or `force`); True if written.

        `data_iterator` (a grain DataLoaderIterator or DatasetIterator, or an object delegating to a
        DataLoaderIterator such as input_pipeline.DataIterator) has its position read here, before `save` returns, so
        the caller may advance it at once, also while the asynchronous write runs.
        A step that is already saved is skipped (returns False), so a final forced save that
        coincides with a periodic one is harmless. With several processes, all must call this
        with the same step and all or none of them with a data_iterator.
        """
        step = int(step)
        if self._read_only:
            raise ValueError(f"Checkpointer for {self._directory} is read_only; it cannot save.")
        if not force and not self.due(step):
            return False
        if step in self._manager.all_steps():
            return False
        _reject_typed_keys(state, "state")
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(item=_StateSnapshot(data_iterator))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config_to_dict(config))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    # -------------------------------------------------------------------------------- restore
    def restore(self, step: int | None = None, *, abstract_state: Any, data_iterator: Any = None,
                restore_data: bool = True) -> tuple[Any, bool, dict | None]:
        """Restores (state, data_restored, config_dict) from `step` (None = the latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (or of arrays,
        whose shardings are used): every array is read straight into that sharding, which may be
        on a different mesh than the one that saved it. Dtypes are cast to the requested ones.

        `data_iterator` (as for `save`) is set, in place, to the position the checkpoint holds for
        this process; `data_restored` says whether that happened (False without a data_iterator,
        with `restore_data=False`, or when the checkpoint has no data state, in which cases the
        iterator is left as it is). `restore_data=False` skips the data state, e.g. after changing the
        number of processes, which changes how the data is split, so the old iterator states no
        longer apply. `config_dict` is None when the checkpoint has none.

        Raises CheckpointMismatchError when the checkpoint's shapes or its number of processes do
        not fit, and its subclass DataStateMismatchError when the iterator refuses the saved state
        (the data changed); CheckpointDamagedError (or orbax's errors) for damaged files.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint under {self._directory}.")
        step = int(step)
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} under {self._directory}; "
                f"complete steps: {self.all_steps()}.")
        _reject_typed_keys(abstract_state, "abstract_state")
        abstract_state = jax.tree_util.tree_map_with_path(_as_abstract, abstract_state)
        self._check_shapes(step, abstract_state)

        step_dir = self.step_dir(step)
        data_record = None
        if data_iterator is not None:
            _check_iterator(data_iterator)
        if data_iterator is not None and restore_data and (step_dir / DATA).exists():
            # Read and checked before anything is restored: a damaged file leaves the iterator untouched.
            data_record = self._read_data_file(step, step_dir / DATA)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if (step_dir / CONFIG).exists():
            items[CONFIG] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        config = restored[CONFIG] if CONFIG in items else None
        if data_record is not None:
            self._restore_data(step, data_record, data_iterator, config)
        return restored[STATE], data_record is not None, config

    def _restore_data(self, step: int, record: Any, iterator: Any, config: dict | None) -> None:
        """Sets `iterator` to the saved state `record` (the data file's parsed JSON)."""
        legacy, state = _legacy_data_state(record)
        try:
            if legacy:   # written by this module before it used grain's handler
                iterator.set_state(state)
                iterator.start_prefetch()   # as grain's handler does after set_state
            else:
                self._manager.restore(step, args=ocp.args.Composite(
                    **{DATA: grain.checkpoint.CheckpointRestore(item=iterator)}))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise DataStateMismatchError(
                f"Checkpoint step {step} in {self._directory} holds a data-iterator state that "
                f"{type(iterator).__name__} refuses ({type(e).__name__}: {e}); the data or its settings "
                "changed since it was written. Restore with restore_data=False to restart the data "
                "stream instead.", step=step, config=config) from e

    def restore_subtree(self, step: int, abstract_items: Mapping[str, Any]) -> dict:
        """Only the named top-level entries of a step's state (e.g. {'ema_params': ..., 'vq': ...}),
        read by orbax's partial restore: what inference needs, without building the optimizer state.

        Each entry is an abstract tree like `restore`'s; its shapes are checked the same way.
        """
        self.wait()
        step = int(step)
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step} under {self._directory}; "
                                    f"complete steps: {self.all_steps()}.")
        target = {k: jax.tree_util.tree_map_with_path(_as_abstract, v) for k, v in abstract_items.items()}
        self.verify(step)
        saved = ocp.tree.serialize_tree(self._manager.item_metadata(step)[STATE].tree, keep_empty_nodes=True)
        missing = sorted(set(target) - set(saved))
        if missing:
            raise CheckpointMismatchError(f"Checkpoint step {step} in {self._directory} has no {missing} "
                                          f"(it holds {sorted(saved)}).")
        problems = describe_mismatch(_flat_shapes({k: saved[k] for k in target}), _flat_shapes(target))
        if problems:
            raise CheckpointMismatchError(f"Checkpoint step {step} in {self._directory} does not fit the model "
                                          "being restored:\n" + "\n".join(problems) + "\nRestore with the config "
                                          "that wrote it (saved in its config/ folder).")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(self.step_dir(step) / STATE, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))

    def restore_latest(self, *, abstract_state: Any, data_iterator: Any = None, restore_data: bool = True):
        """(step, state, data_restored, config_dict) of the newest step that restores, or None if none does.

        `data_iterator` is restored in place, as in `restore`. A damaged step (a missing metadata
        file, a truncated or zero-filled data file, an empty folder) is reported, moved aside to
        `<workdir>/checkpoints_damaged/<step>` (never deleted) and the next older step is tried. A sound step that does not fit `abstract_state`
        (CheckpointMismatchError: the config changed; DataStateMismatchError: the data changed; or
        another number of processes) is not damage and is raised as it is.
        """
        if data_iterator is not None:
            _check_iterator(data_iterator)   # a wrong argument, not damage: raised before any step is tried
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, abstract_state=abstract_state, data_iterator=data_iterator,
                                            restore_data=restore_data))
            except CheckpointMismatchError:
                raise
            except (CheckpointDamagedError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                self._set_aside(step, f"{type(e).__name__}: {e}")
        return None

    def verify(self, step: int) -> None:
        """Raises CheckpointDamagedError naming what is missing from a step's folder (no arrays are read)."""
        step_dir = self.step_dir(step)
        state_dir = step_dir / STATE
        if not state_dir.exists():
            present = sorted(p.name for p in step_dir.iterdir()) if step_dir.exists() else []
            raise CheckpointDamagedError(f"step {step} has no {STATE}/ folder (it holds {present or 'nothing'}).")
        for name in ("_METADATA", "manifest.ocdbt"):
            if not (state_dir / name).exists():
                raise CheckpointDamagedError(f"step {step} lacks {STATE}/{name}.")
        try:
            metadata = self._manager.item_metadata(step)
            tree = metadata[STATE].tree if metadata is not None and metadata[STATE] is not None else None
        except Exception as e:  # orbax raises many kinds on a half-written folder
            raise CheckpointDamagedError(f"step {step}'s metadata cannot be read: {type(e).__name__}: {e}") from e
        if tree is None:
            raise CheckpointDamagedError(f"step {step}'s {STATE}/_METADATA holds no tree.")

    def _set_aside(self, step: int, why: str) -> None:
        """Moves a damaged step out of the listing (to checkpoints_damaged/), keeping every file."""
        source = self.step_dir(step)
        target_root = self._directory.parent / DAMAGED_DIR
        target = target_root / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target_root / f"{step}.{suffix}", suffix + 1
        logging.warning("Checkpoint step %d in %s is damaged (%s). Moving it aside to %s and trying the "
                        "previous step.", step, self._directory, why, target)
        if self._read_only:
            raise CheckpointDamagedError(
                f"checkpoint step {step} in {self._directory} is damaged ({why}); this reader is read-only, so it "
                f"is not moved: restore an earlier step explicitly (complete steps: {self.all_steps()}).")
        if jax.process_index() == 0:
            target_root.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            (target / "DAMAGED.txt").write_text(f"step {step} failed to restore: {why}\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises a CheckpointMismatchError naming every leaf whose saved shape differs from the target's."""
        self.verify(step)
        saved_tree = self._manager.item_metadata(step)[STATE].tree
        problems = describe_mismatch(_flat_shapes(saved_tree), _flat_shapes(abstract_state))
        if problems:
            config_path = self.step_dir(step) / CONFIG / CONFIG_FILENAME
            where = (f"Its config is saved in {config_path}: compare it with the current one and "
                     "restore with the same settings" if config_path.exists() else
                     "(This checkpoint was saved without its config.) Restore with the settings "
                     "that wrote it")
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self._directory} does not fit the state being "
                "restored:\n" + "\n".join(problems) + "\n"
                "The config most likely differs from the one that wrote this checkpoint (model "
                f"widths, vocabulary or codebook size, optimizer). {where}, or start a new run "
                "in a fresh --workdir.")

    def _read_data_file(self, step: int, data_dir: epath.Path) -> Any:
        """The parsed JSON of this process's data file in `data_dir` (grain's format or the old one)."""
        path = data_dir / self._data_file
        if not path.exists():
            present = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
            counts = {p.rsplit("-of-", 1)[-1].removesuffix(".json") for p in present if "-of-" in p}
            if counts and str(jax.process_count()) not in counts:
                # A sound checkpoint of another run shape: not damage, so restore_latest does not set it aside.
                raise CheckpointMismatchError(
                    f"No data-iterator state {self._data_file} in {data_dir} (it holds {present}): "
                    "the checkpoint was written by a different number of processes. Restore with "
                    "restore_data=False (the trainer's --config.restore_data_state=False) to restart "
                    "the data stream instead.")
            raise CheckpointDamagedError(f"step {step} has no data-iterator state {self._data_file} in "
                                         f"{data_dir} (it holds {present or 'nothing'}).")
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError) as e:   # truncated, zero-filled
            raise CheckpointDamagedError(f"step {step}'s data-iterator state {path} is not JSON: "
                                         f"{type(e).__name__}: {e}") from e

    # ----------------------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Blocks until an asynchronous save has been fully written (and old steps pruned)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for outstanding writes and releases orbax's threads. Call before exiting."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

