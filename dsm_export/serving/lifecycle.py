"""The serving process's lifecycle, apart from any model: signals, the environment Triton's child
processes need, and ending and cleaning up after those children. Processes are found and ended
with psutil.

* :func:`stop_on_signals`: SIGINT and SIGTERM set an event (the server loop watches it) while the
  block runs, and raise :class:`Interrupted` inside :meth:`Signals.interruptible` blocks (the steps
  of the start that take seconds and leave nothing to finish); the previous handlers come back after.
* :func:`prepend_libdir`: PyTriton's Python-backend stub loads the system's libpython, so Triton
  is started with ``LD_LIBRARY_PATH`` led by ``sysconfig.get_config_var("LIBDIR")``.
* :func:`detach_pytriton`: takes a PyTriton ``Triton``'s shutdown out of PyTriton's hands. PyTriton's
  ``Triton.stop()`` first takes the condition that ``Triton.connect()`` holds for the whole of its
  waits (the server ready, up to 120 s; each model ready, up to 60 s), so a stop while Triton starts or
  loads its models waits for those; it is also registered with ``atexit`` and called by Triton's
  exit callback and, in a non-daemon thread, by a model's closing event, each of which would wait on
  the same lock.
* :func:`end_tree`: ends Triton (SIGINT and a short grace while it serves, so that requests in
  flight are answered) and then every process this one started, the ``triton_python_backend_stub``
  processes included (they ignore SIGTERM): each is suspended until no new one appears, then killed.
  Stubs orphaned by a Triton that died first are found by the shared-memory prefix in their
  command line.
* :func:`remove_leftovers`: the PyTriton workspace, Triton's stub model folders in the temporary
  folder and this process's PyTriton shared memory.
* :func:`run_bounded`: a call given a time limit (in a daemon thread), for PyTriton's proxy threads,
  which it joins without a timeout.
* :func:`exit_process`: the command's exit once ``serve`` returned, without the seconds of the
  interpreter's finalization.
* :class:`ShutdownGuard`: a last bound on a shutdown; past it every thread's stack is dumped, the
  children are ended, their leftovers removed and the process exits.
"""

from __future__ import annotations

import atexit
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

import psutil

SHUTDOWN_LIMIT_S = 9.0  # longest teardown before ShutdownGuard ends the process (a normal one: under 4 s)
EXIT_LIMIT_S = 5.0  # longest interpreter exit after serve() returned, run as the command
GRACE_S = 3.0  # a serving Triton's time after SIGINT to answer the requests in flight
KILL_WAIT_S = 2.0  # longest wait for killed processes to be gone
CLEAN_LIMIT_S = 1.5  # longest wait for PyTriton's proxy threads and the micro-batchers to stop
POLL_S = 0.05
SHM_PREFIX = "pytrtion"  # PyTriton's shared-memory prefix (sic), followed by the serving process's id


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while a :meth:`Signals.interruptible` block ran."""


class Signals:
    """What :func:`stop_on_signals` yields: the ``stop`` event and :meth:`interruptible`."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._armed = False

    @contextlib.contextmanager
    def interruptible(self):
        """While the block runs, a signal also raises :class:`Interrupted` in the main thread,
        wherever it is: for steps that take seconds and leave nothing half done that the teardown
        does not end (checks, imports, binding models before Triton starts). Code the exception
        passes through may turn it into another (a C extension's import gives ImportError): any
        exception out of the block once ``stop`` is set is raised as :class:`Interrupted`. Code that
        swallows it runs on; the caller checks ``stop`` after the block.

        Raises:
            Interrupted: at once when ``stop`` is already set, or when a signal arrives in the block.
        """
        if self.stop.is_set():
            raise Interrupted("stopped before the step")
        self._armed = True
        try:
            if self.stop.is_set():  # a signal between the check above and arming
                raise Interrupted("stopped before the step")
            yield
        except Interrupted:
            raise
        except BaseException as exc:
            if self.stop.is_set():
                raise Interrupted(f"stopped ({type(exc).__name__} on the way)") from exc
            raise
        finally:
            self._armed = False

    def _on_signal(self, signum, frame) -> None:
        self.stop.set()
        if self._armed:
            self._armed = False
            raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While the block runs, SIGINT and SIGTERM set ``stop`` (the caller watches it) and, inside a
    :meth:`Signals.interruptible` block, raise :class:`Interrupted`; yields the :class:`Signals`. The
    handlers before the block are restored when it ends, however it ends. Main thread only
    (``signal.signal`` raises ValueError elsewhere)."""
    signals = Signals(stop)
    old = {s: signal.signal(s, signals._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}  # noqa: SLF001
    try:
        yield signals
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


# ------------------------------------------------------------------ PyTriton
def detach_pytriton(triton) -> tuple[int | None, object]:
    """Take a PyTriton ``Triton``'s shutdown out of PyTriton's hands, without waiting for its lock.

    Marks it stopped (a later ``stop()`` does nothing once it has the lock), removes its ``atexit`` hook and Triton's
    exit callback (both call ``stop()``, which waits for the lock that ``connect()`` holds through its
    waits) and clears its models' event observers (a model's closing event calls ``stop()`` in a
    non-daemon thread, which would hold the interpreter's exit). Uses PyTriton 0.7's private fields;
    each step is skipped where a field is missing.

    Returns:
        ``(pid, server)``: the tritonserver process id (None when it was never started) and PyTriton's
        ``TritonServer`` (its ``logs()`` give Triton's output so far; None before the start).
    """
    atexit.unregister(triton.stop)
    triton._stopped = True  # noqa: SLF001 - set without the lock connect() may hold
    server = getattr(triton, "_triton_server", None)
    callbacks = getattr(server, "_on_exit", None)
    on_exit = getattr(triton, "_on_tritonserver_exit", None)
    if callbacks is not None:  # replaced, not changed in place: the callbacks' lock may be held
        server._on_exit = [c for c in list(callbacks) if c != on_exit]  # noqa: SLF001
    manager = getattr(triton, "_model_manager", None)
    for model in list(getattr(manager, "models", [])):
        lock = getattr(model, "_observers_lock", None)
        got = lock.acquire(timeout=1.0) if lock is not None else False
        try:
            getattr(model, "_model_events_observers", []).clear()
        finally:
            if got:
                lock.release()
    command = getattr(server, "_tritonserver_running_cmd", None)
    return (getattr(command, "pid", None), server)


def run_bounded(fn, limit_s: float, name: str) -> bool:
    """Call ``fn()`` in a daemon thread and wait for it at most ``limit_s`` seconds; an exception it
    raises is dropped (it is cleanup). Returns whether it finished in time (if not, it goes on in the
    background and does not hold the interpreter's exit)."""

    def run():
        with contextlib.suppress(Exception):
            fn()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(limit_s)
    return not thread.is_alive()


# ------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (psutil); empty when ``pid`` is gone."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _gone(proc: psutil.Process) -> bool:
    """Whether ``proc`` has ended (a zombie has: it only waits to be reaped)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait at most ``timeout_s`` seconds for every process of ``procs`` to end; returns those still
    running. Polls instead of ``psutil.wait_procs``, which reaps a child of this process: Triton's is
    reaped by PyTriton's ``sh`` thread, whose own wait would then fail."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = [p for p in left if not _gone(p)]
    return left


def _own_resource_tracker(proc: psutil.Process) -> bool:
    """Whether ``proc`` is this process's multiprocessing resource tracker (it ends with us, and
    unlinks what we leave in shared memory)."""
    try:
        return proc.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _suspend_tree(pid: int) -> list[psutil.Process]:
    """SIGSTOP every descendant of ``pid`` but our resource tracker, listing them again until no new
    one appears (a stopped process starts no other, so the list is then complete); returns them."""
    stopped: dict[int, psutil.Process] = {}
    for _ in range(50):
        try:
            found = [p for p in psutil.Process(pid).children(recursive=True) if p.pid not in stopped]
        except psutil.Error:
            break
        found = [p for p in found if not _own_resource_tracker(p)]
        if not found:
            break
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.suspend()
            stopped[proc.pid] = proc
    return list(stopped.values())


def _orphans(pid: int) -> list[psutil.Process]:
    """Processes whose command line names ``pid``'s PyTriton shared memory (``pytrtion<pid>-``):
    Triton, and Python-backend stubs that outlived it (no longer our descendants)."""
    marker = f"{SHM_PREFIX}{pid}-"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != pid and any(marker in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def kill_all(procs: list[psutil.Process]) -> list[psutil.Process]:
    """SIGKILL every process of ``procs`` (stopped or not) and wait at most ``KILL_WAIT_S`` seconds for
    them to end; returns those still running."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return wait_gone(procs, KILL_WAIT_S)


def end_tree(server_pid: int | None = None, grace_s: float = 0.0, drained=None) -> set[str]:
    """End every process this one started: Triton first, then what is left, stubs included.

    Args:
        server_pid: Triton's process id; with ``grace_s`` > 0 it is sent SIGINT (it stops taking
            requests, answers those in flight within its exit timeout, then unloads the models) and
            given up to ``grace_s`` seconds to exit, or until ``drained()`` returns True.
        grace_s: seconds (0: no SIGINT, everything is killed at once, as while Triton starts).
        drained: optional callable, True once Triton has no request in flight.

    Returns:
        The stub model folders (``/tmp/folderXXXX``) named by the ended processes, for
        :func:`remove_leftovers`. Processes still running after SIGKILL are not an error (the
        kernel may take a moment); bounded by about ``grace_s + 2 * KILL_WAIT_S`` seconds.
    """
    if server_pid is not None and grace_s > 0:
        with contextlib.suppress(psutil.Error):
            server = psutil.Process(server_pid)
            server.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace_s
            while not _gone(server) and time.monotonic() < deadline and not (drained and drained()):
                time.sleep(POLL_S)
    procs = _suspend_tree(os.getpid())
    folders = stub_folders(procs)
    kill_all(procs)
    orphans = _orphans(os.getpid())
    folders |= stub_folders(orphans)
    kill_all(orphans)
    return folders


def end_children(children: list[int], folders: set[str], workspace: str | None, grace_s: float = 3.0) -> None:
    """Remove ``workspace``; end ``children`` (process ids, all but our resource tracker: SIGTERM,
    up to ``grace_s`` seconds, then SIGKILL), every descendant they left and the stubs that name our
    shared memory; remove the stub ``folders`` and the rest of :func:`remove_leftovers`."""
    if workspace:
        shutil.rmtree(workspace, ignore_errors=True)
    procs = []
    for pid in children:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    procs = [p for p in procs if not _own_resource_tracker(p)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    kill_all(wait_gone(procs, grace_s))
    remove_leftovers(folders | end_tree(), workspace)


def stub_folders(procs: list) -> set[str]:
    """Temporary model folders Triton made for PyTriton's stubs (``/tmp/folderXXXX/1/model.py`` in
    a stub's command line), of ``procs`` (``psutil.Process`` objects or process ids)."""
    tmp = os.path.realpath(tempfile.gettempdir())
    folders = set()
    for proc in procs:
        try:
            args = (proc if isinstance(proc, psutil.Process) else psutil.Process(proc)).cmdline()
        except psutil.Error:
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


def remove_leftovers(folders: set[str], workspace: str | None = None) -> None:
    """Remove what a Triton that did not stop by itself leaves: ``workspace`` (PyTriton's, or None), the
    stub model ``folders`` and those whose config names the workspace, and this process's PyTriton
    shared-memory segments (``/dev/shm/pytrtion<pid>-*``). Errors are ignored (cleanup)."""
    if workspace:
        folders = folders | _model_folders(workspace)
        shutil.rmtree(workspace, ignore_errors=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    shm = "/dev/shm"
    if os.path.isdir(shm):
        for entry in os.listdir(shm):
            if entry.startswith(f"{SHM_PREFIX}{os.getpid()}-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(shm, entry))


def exit_process(code: int, limit_s: float = EXIT_LIMIT_S) -> None:
    """End this process with status ``code`` now: the ``atexit`` callbacks run (logging is flushed,
    multiprocessing's children are ended), stdout and stderr are flushed, then ``os._exit``. For a
    command whose work is done and cleaned up: the interpreter's own finalization (freeing PyTorch,
    ONNX Runtime and the other extension modules) took 4.5 s on a loaded 2-core machine against
    0.2 s this way, and it would also wait for any non-daemon thread. A :class:`ShutdownGuard` of
    ``limit_s`` seconds bounds the ``atexit`` callbacks. Does not return."""
    ShutdownGuard(limit_s, code, what="exiting after Triton stopped")
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter's exit would run first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class ShutdownGuard:
    """Bound a shutdown: unless :meth:`cancel` is called within ``limit_s`` seconds, end the process.

    When the limit passes, a daemon thread prints one line and every thread's stack (Python's
    ``faulthandler``) to stderr, ends every descendant process (SIGTERM, then SIGKILL), removes
    ``workspace``, Triton's stub folders and this process's PyTriton shared memory, flushes stdout and
    stderr and calls ``os._exit(code)``. A last resort: the teardown of ``serve`` is bounded on its
    own, but a thread that never ends would otherwise keep the interpreter's exit (which joins
    non-daemon threads) waiting for ever.

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
        end_children(children, stub_folders(children), self.workspace, grace_s=1.0)
        print("stopped (forced)", flush=True)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(self.code)
