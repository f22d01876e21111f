"""What a resumed or failing run does, in-process on the tiny config over an image folder: a data change
after a checkpoint, settings changed on resume, the checkpoint written before the evaluation that fails,
and the real error (Ctrl-C included) surviving a checkpointer that cannot close.

One run per test module (4 steps, a checkpoint at 4) is continued in turn; every call is
`train.train_and_evaluate`, the function `main` calls.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

import tiny_configs
from v2flow_jax import checkpointing, evaluate, train


@pytest.fixture(autouse=True)
def _absl_info():
    """absl's own level filters before pytest's caplog sees a record; earlier tests may have raised it."""
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(before)


def _write_photos(folder, first, count):
    rng = np.random.default_rng(first)
    folder.mkdir(exist_ok=True)
    for i in range(first, first + count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _config(folder, **overrides):
    return tiny_configs.tiny_config(**{"data.source": "folder", "data.path": str(folder), "num_steps": 4,
                                       "checkpoint_every": 4, "log_every": 2, **overrides})


def _no_evaluation(self, *args, **kwargs):
    """Stands in for the evaluator where a test is about training and checkpoints, not about metrics
    (each real evaluation compiles five decodes)."""
    return {}


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """(folder, workdir) of a finished 4-step run on 8 photos."""
    root = tmp_path_factory.mktemp("resume_rules")
    folder, workdir = root / "photos", root / "run"
    _write_photos(folder, 0, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate.Evaluator, "run", _no_evaluation)
        train.train_and_evaluate(_config(folder), str(workdir))
    assert _steps(workdir) == [4]
    return folder, workdir


def test_data_change_is_named_and_restore_data_state_false_resumes(started, monkeypatch, caplog):
    folder, workdir = started
    monkeypatch.setattr(evaluate.Evaluator, "run", _no_evaluation)
    _write_photos(folder, 8, 5)    # the folder grew: the saved iterator position no longer applies
    with pytest.raises(ValueError, match=r"restore_data_state=False") as err:
        train.train_and_evaluate(_config(folder, num_steps=6, **{"optim.base_lr": 0.5}), str(workdir))
    assert "files added to or removed from the folder" in str(err.value)
    assert _steps(workdir) == [4]   # nothing was written by the refused resume
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(_config(folder, num_steps=6, restore_data_state=False,
                                         **{"optim.base_lr": 0.5}), str(workdir))
    text = caplog.text
    assert "Resumed from" in text and "data stream restarts" in text
    assert "optim.base_lr" in text and "-> 0.5" in text     # a changed setting is said, not silently used
    assert _steps(workdir)[-1] == 6


def test_checkpoint_is_saved_before_the_evaluation_and_the_real_error_is_last(started, monkeypatch, caplog):
    """Ctrl-C during an evaluation loses no training: the step's checkpoint is already on disk. A
    checkpointer that then fails to close (a full disk) is logged, and the KeyboardInterrupt (a
    BaseException, which `except Exception` would miss) propagates."""
    folder, workdir = started
    before = _steps(workdir)[-1]
    target = before + 2

    def failing_evaluation(self, *args, **kwargs):
        raise KeyboardInterrupt

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.Evaluator, "run", failing_evaluation)
    monkeypatch.setattr(checkpointing.Checkpointer, "close", full_disk)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(_config(folder, num_steps=target, restore_data_state=False), str(workdir))
    assert _steps(workdir)[-1] == target
    assert "No space left on device" in caplog.text and "also failed" in caplog.text
    monkeypatch.undo()
    # and the saved step is intact: the next run resumes from it and has nothing left to do
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(_config(folder, num_steps=target, restore_data_state=False), str(workdir))
    assert f"already finished at step {target}" in caplog.text
