"""Atomic file writes: the data goes to a temporary file beside the target, which is renamed over the target only
once complete. Readers never see half a file, and a failed or interrupted write (KeyboardInterrupt included) leaves
nothing behind. Standard library only, so every module that writes files can use it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def _create_temp_file(directory: Path, prefix: str, suffix: str) -> str:
    """Create an empty, new file in ``directory`` with the usual permissions (0o666 less the umask); return its path.

    Why not tempfile.mkstemp + chmod: mkstemp creates 0600, and reading the umask to widen that means setting it,
    process-wide, which races with every other thread creating files. ``os.open`` with a mode lets the kernel apply
    the umask itself; O_EXCL makes the name ours alone.
    """
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        except FileExistsError:  # another writer's name (48 random bits: practically never)
            continue
        return path
    raise FileExistsError(f"no unused temporary file name found in {directory}")


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
        temporary = _create_temp_file(path.parent, f".{path.stem}.", f".partial{path.suffix}")
    except OSError as exc:
        raise RuntimeError(f"cannot write to '{path.parent}': {exc.strerror or exc}; choose a writable location") from exc
    try:
        write(temporary)
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
