"""Atomic file and directory output: written into a temporary sibling, renamed into place only on
success.

A crash or an exception leaves the previous output (if any) untouched and no half-written one
under the final name; the temporary sibling (``.NAME.partial-*``) is removed on exceptions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``out_dir``; rename it to ``out_dir`` on success.

    Raises ``FileExistsError`` naming ``out_dir`` when it exists and ``overwrite`` is False; with
    ``overwrite`` an existing directory (or file) is replaced.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    # mkdtemp makes it private (0700); the output gets the mode any new directory would (umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.rename(tmp, out)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically: a temporary sibling, flushed and fsynced, then
    ``os.replace`` (readers see the old content or the new, never a part)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
