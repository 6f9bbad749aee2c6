"""Up-front checks of what a subcommand will need, so that a user mistake stops it before any work.

Every subcommand calls these first: output files and folders must be writable, ports free, input
files present, images readable. Each raises :class:`~dsm_export.errors.DSMError` (one line, exit 2)
and none of them writes anything.
"""

from __future__ import annotations

import errno
import os
import socket

from PIL import Image

from .errors import DSMError


def output_file(path: str | None, what: str = "output") -> None:
    """Check that ``path`` can be written (atomically: a temporary file in its folder, then a rename).

    Args:
        path: the file to be written; None means "no such output" and passes.
        what: how to name it in the message (e.g. ``"--json"``).

    Raises:
        DSMError: if the folder does not exist or is not writable, or ``path`` is a folder or a
            file that cannot be replaced.
    """
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DSMError(f"{what} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DSMError(f"{what} {path!r}: folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise DSMError(f"{what} {path!r} is a folder, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise DSMError(f"{what} {path!r} exists and is not writable")


def output_folder(path: str, what: str = "output folder") -> None:
    """Check that ``path`` is a writable folder or can be created (its nearest existing ancestor
    is a writable folder).

    Raises:
        DSMError: if ``path`` is a file, or it cannot be created or written.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise DSMError(f"{what} {path!r} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DSMError(f"{what} {path!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DSMError(f"{what} {path!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DSMError(f"{what} {path!r} cannot be created: {parent!r} is not writable")


def input_file(path: str | None, what: str = "file") -> None:
    """Check that ``path`` (if given) is a readable file.

    Raises:
        DSMError: if it does not exist, is a folder, or cannot be read.
    """
    if not path:
        return
    if not os.path.exists(path):
        raise DSMError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise DSMError(f"{what} {path!r} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise DSMError(f"{what} {path!r} is not readable")


def ports_free(host: str, ports: dict[str, int]) -> None:
    """Bind-test each port on ``host`` (then release it), before a server is started.

    Args:
        host: the address the server will bind (e.g. ``127.0.0.1`` or ``0.0.0.0``).
        ports: ``{"HTTP": 8000, ...}``, named for the message.

    Raises:
        DSMError: a port out of range, two equal ports, a port in use, or an address this machine
            does not have.
    """
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise DSMError(f"{name} port {port} is out of range (1-65535)")
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise DSMError(f"{name} and {seen[port]} ports are both {port}")
        seen[port] = name
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DSMError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, sockaddr = infos[0]
    for name, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as servers set it: a port in TIME_WAIT is free, a listening one is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise DSMError(f"{name} port {port} on {host} is already in use "
                                   f"(choose another with --{name.lower()}-port)") from None
                if exc.errno == errno.EACCES:
                    raise DSMError(f"{name} port {port} on {host}: permission denied "
                                   "(ports below 1024 need privileges)") from None
                raise DSMError(f"{name} port {port} on {host}: cannot bind ({exc.strerror})") from None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (bound to port 0 together, then released), for
    tests and scripts that start servers."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def readable_images(images, skip_unreadable: bool = False):
    """Decode every image once (JPEG at reduced scale, which still reads all its data) before any work.

    Args:
        images: a :class:`~dsm_export.data.ImageSet`.
        skip_unreadable: leave unreadable images out instead of failing.

    Returns:
        ``(readable ImageSet, [file names left out])``.

    Raises:
        DSMError: an unreadable image without ``skip_unreadable`` (naming the first and the count),
            or no readable image at all.
    """
    bad: list[tuple[str, str]] = []
    keep = []
    for i, name in enumerate(images.files):
        try:
            with Image.open(images.path(i)) as im:
                im.draft("RGB", (64, 64))
                im.load()
            keep.append(i)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            bad.append((name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    if bad and not skip_unreadable:
        name, why = bad[0]
        raise DSMError(f"{len(bad)} of {len(images)} images in {images.root!r} are unreadable, e.g. {name} "
                       f"({why}); pass --skip-unreadable to leave them out")
    if not keep:
        raise DSMError(f"none of the {len(images)} images in {images.root!r} is readable")
    return images.subset(keep), [name for name, _ in bad]
