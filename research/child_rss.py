"""Run a command as a child process and measure its own peak RSS, free of the parent's.

``os.wait4``'s ``ru_maxrss`` of a child is not the child's alone on Linux: ``execve`` keeps the
high-water RSS of the memory it replaces (``setmax_mm_hiwater_rss`` in ``fs/exec.c``), and Python's
``subprocess`` starts children with ``vfork``, whose memory *is* the parent's until the exec. So a
child's peak RSS reads at least the parent's own peak: research/scale.py, after timing ViT-L's ONNX
Runtime sessions in-process, read 12.3 GB for every later export, DINOv2's 350 MB model included.

:func:`run_measured` puts a small launcher (a bare Python, ~10 MB) between the two: the launcher
starts the command, waits for it, and writes the command's ``ru_maxrss`` to a file. The command's
exec then keeps only the launcher's high-water mark.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

# argv: [rss_file, command...]; the command's exit code is the launcher's (a signal: 128 + signal)
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    fh.write(str(usage.ru_maxrss))\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "sys.exit(code if code >= 0 else 128 - code)\n"
)


def run_measured(cmd: list[str], *, cwd: str | None = None, stdout=None, stderr=None) -> dict:
    """Run ``cmd`` (an argv list) to its end and measure it.

    ``stdout`` and ``stderr`` are as for :class:`subprocess.Popen` (``subprocess.PIPE`` for
    ``stdout`` collects the output as text; ``stderr=subprocess.STDOUT`` merges it in).

    Returns:
        ``{"returncode", "seconds", "peak_rss_bytes", "output"}``: the command's exit code, the wall
        time (s) from start to exit, its own peak RSS in bytes (``ru_maxrss``, KiB on Linux; None if
        the launcher failed to write it), and its output (str) when ``stdout`` was a pipe, else None.
    """
    fd, rss_file = tempfile.mkstemp(prefix="dsm-rss-", suffix=".txt")
    os.close(fd)
    try:
        start = time.perf_counter()
        with subprocess.Popen([sys.executable, "-c", LAUNCHER, rss_file, *cmd], cwd=cwd, stdout=stdout,
                              stderr=stderr, text=True) as proc:
            output = proc.stdout.read() if stdout == subprocess.PIPE else None
            returncode = proc.wait()
        seconds = time.perf_counter() - start
        with open(rss_file, encoding="utf-8") as fh:
            text = fh.read().strip()
        peak = int(text) * 1024 if text else None
    finally:
        os.unlink(rss_file)
    return {"returncode": returncode, "seconds": seconds, "peak_rss_bytes": peak, "output": output}
