"""Atomic file writes: a reader never sees a half-written output.

Everything is written to a hidden temporary file beside the target (same folder, same
suffix, so tools that infer the format from the name still work) and moved into place with
``os.replace``, which is atomic on POSIX file systems. On error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (:func:`numpy.savez`) and return the path."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to the temporary name
            np.savez(fh, **arrays)
    return Path(path)


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` if it is a file; else one error: ``<what> file not found`` or ``not a file``."""
    from cryoorient_ray.errors import CryoOrientError

    p = Path(path)
    if not p.exists():
        raise CryoOrientError(f"{what} file not found: {p}")
    if not p.is_file():
        raise CryoOrientError(f"{p}: not a file")
    return p


def strip_suffixes(name: str, suffixes: tuple[str, ...]) -> str:
    """``name`` without a trailing ``.gz`` and then one of ``suffixes`` (case-insensitive)."""
    if name.lower().endswith(".gz"):
        name = name[:-3]
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
