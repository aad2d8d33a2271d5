"""Atomic outputs get the permissions a plain open()/mkdir() would give, not mkstemp's owner-only ones."""

import os
import stat

from reqnoise import atomic


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        # the oracle: what the OS gives a file and a directory created plainly under the same umask
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "plain.txt") == 0o644
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain") == 0o755
