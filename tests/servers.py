"""A real ``dsm-export serve`` subprocess on free loopback ports, for the serving and fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dsm_export.checks import free_ports  # noqa: F401  (re-exported for the tests)
from dsm_export.serving.serve import descendants  # noqa: F401

PYTRITON_HOME = os.path.join(os.path.expanduser("~"), ".cache", "pytriton")


def workspaces() -> set[str]:
    """Entries of PyTriton's workspace home (``~/.cache/pytriton``)."""
    return set(os.listdir(PYTRITON_HOME)) if os.path.isdir(PYTRITON_HOME) else set()


def own_workspaces(pid: int, before: set[str]) -> set[str]:
    """Workspace entries that appeared since ``before`` and belong to server process ``pid``
    (``dsm-export serve`` names its workspace ``dsm-serve-<pid>-<random>``; other sessions'
    PyTriton servers may add and remove their own meanwhile)."""
    return {w for w in workspaces() - before if w.startswith(f"dsm-serve-{pid}-")}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """``python -m dsm_export serve FILES ...`` with its output in a log file (closed by :meth:`close`)."""

    def __init__(self, files: list[str], names: list[str], log_path: str, extra: list[str] = (),
                 ports: list[int] | None = None):
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        args = [sys.executable, "-m", "dsm_export", "serve", *files]
        for n in names:
            args += ["--name", n]
        args += ["--http-port", str(self.http), "--grpc-port", str(self.grpc),
                 "--metrics-port", str(self.metrics), *extra]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_ready(self, models: list[str], timeout: float = 240) -> None:
        """Poll ``is_model_ready`` for every model (the server reports ready before its models are).

        Raises:
            RuntimeError: the server exited or was not ready in time (with the end of its log).
        """
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.url)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start:\n" + self.log()[-3000:])
                time.sleep(0.5)
        finally:
            client.close()

    def wait_log(self, text: str, timeout: float = 240) -> float:
        """Wait until ``text`` appears in the log; returns seconds since the start."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} never appeared:\n" + self.log()[-3000:])
            time.sleep(0.1)
        return time.monotonic() - self.started

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        """Stop the server if it still runs (SIGTERM, so that it cleans up; SIGKILL after 60 s),
        reap it and close the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(60)
        self._log.close()


def start_ready(files: list[str], names: list[str], log_path: str, extra: list[str] = (), tries: int = 3) -> Server:
    """A :class:`Server` with every model ready. Free ports are picked, then bound by the server a
    moment later: another session's server may take one in between, which ``serve`` reports at once
    (exit 2, "already in use"), so that case is retried on new ports.

    Raises:
        RuntimeError: the server did not start (with the end of its log).
    """
    models = [*names, *(f"{n}_image" for n in names)]
    for attempt in range(tries):
        srv = Server(files, names, log_path, extra)
        try:
            srv.wait_ready(models)
            return srv
        except RuntimeError:
            srv.close()
            if "already in use" not in srv.log() or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")

