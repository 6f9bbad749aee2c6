"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from .errors import DSMError


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in ``path``'s folder; on success rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was, so no half-written
    output is ever left behind.

    Raises:
        DSMError: if the output folder does not exist.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, data) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (a temporary file beside ``dst``, then a rename)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
