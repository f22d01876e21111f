"""Atomic files: all or nothing, and readable like any file the user's umask allows."""
import os
import stat

import numpy as np
import pytest

from v2flow_jax import atomic_files
from v2flow_jax.metrics import image as image_metrics


def test_written_files_get_the_umask_permissions_not_mkstemps(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_files, "_UMASK", 0o022)       # the umask read at import, as a typical 022
    path = atomic_files.write_bytes(tmp_path / "sub" / "a.json", b"{}")
    png = image_metrics.save_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    assert open(path, "rb").read() == b"{}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 == stat.S_IMODE(os.stat(png).st_mode)
    old = os.umask(0o022)
    os.umask(old)
    assert atomic_files._read_umask() == old and os.umask(old) == old   # reading it leaves it as it was


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_files.write_bytes(path, b"old")

    def half_then_crash(f):
        f.write(b"ne")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        atomic_files.write_with(path, half_then_crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["metrics.json"]
