"""All-or-nothing outputs: write into a temporary sibling, rename into place only when complete.

A run killed mid-write (even by SIGKILL) leaves at most a hidden ``.NAME.tmp-*`` sibling, never a partial
output at the target path. An existing target is replaced only with ``overwrite=True``.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from reqnoise.errors import ReqnoiseError


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` (the check every atomic writer makes first)."""
    if target.exists() and not overwrite:
        raise ReqnoiseError(f"{target} already exists (pass --overwrite / overwrite=True to replace it)")


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        # Move the old output aside first so that a crash between the two renames loses nothing.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old = trash / target.name
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _umask_mode(full: int) -> int:
    """``full`` (0o666 for files, 0o777 for directories) less the process umask: what open() and mkdir() give.
    mkstemp and mkdtemp create owner-only entries, which would leave every output unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


@contextlib.contextmanager
def atomic_dir(target, overwrite: bool = False):
    """Yield a fresh temporary directory; on normal exit it becomes ``target``, on error it is removed."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        check_target(target, overwrite)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target, overwrite: bool = False, mode: str = "w", **open_kwargs):
    """Yield an open file handle; on normal exit the file is renamed to ``target``, on error removed."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _umask_mode(0o666))
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        check_target(target, overwrite)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target, text: str, overwrite: bool = False) -> None:
    """Atomically write ``text`` (UTF-8) to ``target``."""
    with atomic_file(target, overwrite=overwrite, encoding="utf-8") as fh:
        fh.write(text)
