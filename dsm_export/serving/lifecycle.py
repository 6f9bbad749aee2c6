"""The serving process's lifecycle, apart from any model: signals, the environment Triton's child
processes need, and ending and cleaning up after those children.

* :func:`stop_on_signals`: SIGINT and SIGTERM set an event (the server loop watches it) while the
  block runs; the previous handlers come back after.
* :func:`prepend_libdir`: PyTriton's Python-backend stub loads the system's libpython, so Triton
  is started with ``LD_LIBRARY_PATH`` led by ``sysconfig.get_config_var("LIBDIR")``.
* :func:`descendants`, :func:`stub_folders`, :func:`end_children`: after Triton stopped, what it
  leaves is ended and removed: child processes (a Python-backend stub busy with a request when
  Triton hit its exit timeout outlives Triton), its stubs' model folders in the temporary folder,
  the PyTriton workspace and this process's PyTriton shared memory.
* :class:`ShutdownGuard`: a bound on a shutdown; past it every thread's stack is dumped, the
  children are ended, their leftovers removed and the process exits.

Linux: the processes are found in ``/proc`` (none are found where there is no ``/proc``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time

SHUTDOWN_LIMIT_S = 60.0  # longest stop before ShutdownGuard ends the process (PyTriton waits <= 2 x 30 s)
EXIT_LIMIT_S = 20.0  # longest interpreter exit after serve() returned, run as the command


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While the block runs, SIGINT and SIGTERM set ``stop`` (nothing else: the caller watches it);
    the handlers before the block are restored when it ends, however it ends. Main thread only
    (``signal.signal`` raises ValueError elsewhere)."""

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def prepend_libdir() -> None:
    """Put the Python library folder (``sysconfig``'s ``LIBDIR``) first in ``LD_LIBRARY_PATH`` of this
    process, inherited by Triton and its Python-backend stubs (once: a path already led by it is
    left alone)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = libdir + (os.pathsep + current if current else "")


class ShutdownGuard:
    """Bound a shutdown: unless :meth:`cancel` is called within ``limit_s`` seconds, end the process.

    When the limit passes, a daemon thread prints one line and every thread's stack (Python's
    ``faulthandler``) to stderr, sends SIGTERM then SIGKILL to every descendant process, removes
    ``workspace``, Triton's stub folders and this process's PyTriton shared memory, flushes stdout and
    stderr and calls ``os._exit(code)``. It exists because PyTriton joins its inference threads without
    a timeout: one that never ends would otherwise keep ``serve`` (or the interpreter's exit, which
    joins non-daemon threads) waiting for ever.

    Args:
        limit_s: seconds the shutdown may take.
        code: exit status to end with (that of the shutdown being guarded).
        workspace: PyTriton workspace folder to remove, or None.
        what: what is being waited for, for the message (e.g. "stopping Triton").
    """

    def __init__(self, limit_s: float, code: int, workspace: str | None = None, what: str = "shutdown"):
        self.limit_s, self.code, self.workspace, self.what = limit_s, code, workspace, what
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dsm-shutdown-guard", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """The shutdown finished in time: the guard does nothing."""
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.limit_s):
            return
        print(f"dsm-export: {self.what} did not finish in {self.limit_s:.0f} s: ending child processes "
              "and exiting (every thread's stack follows)", file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError, AttributeError):  # stderr without a file descriptor
            pass
        children = descendants(os.getpid())
        end_children(children, stub_folders(children), self.workspace, grace_s=2.0)
        print("stopped (forced)", flush=True)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(self.code)


def end_children(children: list[int], folders: set[str], workspace: str | None, grace_s: float = 3.0) -> None:
    """Remove ``workspace``, end ``children`` (all but our resource tracker) and remove the stub
    ``folders``, the workspace's model folders and our PyTriton shared memory."""
    if workspace:
        shutil.rmtree(workspace, ignore_errors=True)
    _end_processes([p for p in children if not _own_resource_tracker(p)], grace_s=grace_s)
    if workspace:
        folders = folders | _model_folders(workspace)
    _remove_leftovers(folders)


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (from ``/proc``; empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _own_resource_tracker(pid: int) -> bool:
    """Whether ``pid`` is this process's multiprocessing resource tracker (it ends with us, and
    unlinks what we leave in shared memory)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return False
    return ppid == os.getpid() and b"multiprocessing.resource_tracker" in cmd


def _end_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """End what is left of this server's child processes after Triton stopped: a Python-backend
    stub busy with a request when Triton hit its exit timeout outlives Triton. SIGTERM, then SIGKILL
    after ``grace_s``."""
    left = [p for p in pids if _running(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if _running(p)]
        if not left:
            return


def stub_folders(pids: list[int]) -> set[str]:
    """Temporary model folders Triton made for PyTriton's stubs (``/tmp/folderXXXX/1/model.py``)."""
    tmp = os.path.realpath(tempfile.gettempdir())
    folders = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in args:
            if arg.endswith("/1/model.py"):
                folder = os.path.dirname(os.path.dirname(arg))
                if os.path.dirname(folder) == tmp and os.path.basename(folder).startswith("folder"):
                    folders.add(folder)
    return folders


def _model_folders(workspace: str) -> set[str]:
    """Triton's temporary model folders (``/tmp/folderXXXX``) whose config names ``workspace``
    (those of models whose stubs were not running when Triton stopped)."""
    tmp = tempfile.gettempdir()
    found = set()
    try:
        entries = [e for e in os.listdir(tmp) if e.startswith("folder")]
    except OSError:
        return found
    for entry in entries:
        try:
            with open(os.path.join(tmp, entry, "config.pbtxt"), encoding="utf-8", errors="replace") as fh:
                if workspace in fh.read():
                    found.add(os.path.join(tmp, entry))
        except OSError:
            continue
    return found


def _remove_leftovers(folders: set[str]) -> None:
    """Remove what a Triton stopped by its exit timeout leaves: its stubs' model folders and this
    process's PyTriton shared-memory segments (``/dev/shm/pytrtion<pid>-*``)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    shm = "/dev/shm"
    if os.path.isdir(shm):
        for entry in os.listdir(shm):
            if entry.startswith(f"pytrtion{os.getpid()}-"):
                try:
                    os.unlink(os.path.join(shm, entry))
                except OSError:
                    pass
