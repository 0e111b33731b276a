"""Atomic file writes: the data goes to a temporary file beside the target, which is renamed over the target only
once complete. Readers never see half a file, and a failed or interrupted write (KeyboardInterrupt included) leaves
nothing behind. Standard library only, so every module that writes files can use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write(temporary_path)`` fills a temporary file, which then replaces ``path``.

    Missing parent directories are created; the file gets the usual permissions (0666 minus the umask).

    Returns:
        ``path`` as a Path.

    Raises:
        RuntimeError: the directory cannot be created or written (the message names it).
        Whatever ``write`` raises (the temporary file is removed first).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise RuntimeError(f"cannot write to '{path.parent}': {exc.strerror or exc}; choose a writable location") from exc
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file behind
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see `write_atomic`)."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    return write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see `write_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
