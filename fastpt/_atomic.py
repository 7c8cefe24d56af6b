"""Atomic file writes: write to a temporary file beside the target, then rename over it, so a
crash leaves either the old file or the new one, never half of one. Used by every file fastpt
writes (model checkpoints, training checkpoints, adapters, tokenizers). Also the SHA-256
digests that bind the files of one save together."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be
    read by setting it, which races with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path) -> None:
    """Give a file the mode open() would have (0o666 less the umask): mkstemp's files, and
    those safetensors writes, are 0o600, unreadable to the group and others whatever the umask."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path``; the temporary is removed on error.
    The file gets open()'s mode (:func:`give_default_mode`)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        give_default_mode(tmp)  # after the write: some writers (safetensors) replace the file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def sha256_file(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys, no spaces): the same digest however
    the file holding it is indented."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
