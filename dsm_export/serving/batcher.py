"""Dynamic batching inside the serving process: concurrent callers' single images run through the
network together (:class:`MicroBatcher`). ``serve``'s ``<name>_image`` models use it so that one
undecodable image fails only its own request: PyTriton answers every request of a Triton batch
with the error when the callable raises."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

import numpy as np


class MicroBatcher:
    """Run ``run`` on batches gathered from concurrent callers (dynamic batching inside the process).

    A caller hands in ``[1, ...]`` and gets its ``[1, ...]`` row back; one worker thread concatenates
    what arrives within ``max_delay_s`` of the first item, up to ``max_batch`` items.

    Attributes:
        runs: network calls made; ``items``: rows run (``items / runs`` is the mean batch).
    """

    def __init__(self, run, max_batch: int, max_delay_s: float = 0.002):
        self._run, self._max_batch, self._delay = run, max_batch, max_delay_s
        self._queue: queue.Queue = queue.Queue()
        self.runs = self.items = 0
        self._thread = threading.Thread(target=self._loop, name="dsm-microbatcher", daemon=True)
        self._thread.start()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``[1, ...]`` input -> ``[1, ...]`` output; raises what ``run`` raised for its batch."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((x, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.monotonic() + self._delay
            while len(items) < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                items.append(item)
            try:
                out = self._run(np.concatenate([x for x, _ in items]))
                self.runs += 1
                self.items += len(items)
                for i, (_, future) in enumerate(items):
                    future.set_result(out[i:i + 1])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, future in items:
                    future.set_exception(exc)

    def close(self) -> None:
        """Stop the worker (after the items already queued)."""
        self._queue.put(None)
        self._thread.join(timeout=5)
