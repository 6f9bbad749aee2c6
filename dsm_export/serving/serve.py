"""Serve DSM ONNX files with a real Triton Inference Server through PyTriton (loopback by default).

Two models per file, their tensor names read from the ONNX file (``pixel_values`` -> ``logits`` for
a classifier, ``pixel_values`` -> ``embeddings`` for an embedding export):

* ``<name>``: ``pixel_values`` ``[B, 3, H, W]`` FP32 -> the file's output ``[B, D]`` FP32, run by ONNX
  Runtime, batched by Triton's dynamic batcher (HTTP and gRPC).
* ``<name>_image``: ``image`` ``[1]`` BYTES (one encoded JPEG/PNG) -> for a classifier
  ``top_k_indices`` ``[k]`` INT64, ``top_k_scores`` ``[k]`` FP32 (softmax) and, when the model's
  classes are ImageNet's (timm's ``ImageNetInfo``), ``top_k_names`` ``[k]`` BYTES; for an embedding
  export ``embeddings`` ``[D]`` FP32. Preprocessed with the model's timm eval transform. Several
  instances decode images concurrently and their images run through the network together
  (:class:`MicroBatcher`): PyTriton answers every request of a Triton batch with the error when the
  callable raises, so Triton-level batching would let one undecodable image fail its neighbours.

Each model's config (``GET /v2/models/<name>/config``, ``parameters``) names the file it serves:
``dsm.file``, ``dsm.sha256``, ``dsm.model``, ``dsm.schedule``, ``dsm.weights_sha256``.

Lifecycle: everything the user gave (files, names, ports) is checked before Triton starts; SIGINT
or SIGTERM at any phase (starting, loading, serving, mid-request) stops Triton and its child
processes and removes PyTriton's workspace, then returns 0, within seconds: a signal while the files
are checked and bound interrupts that step; Triton and every process under it (the Python-backend
stubs, which ignore SIGTERM, included) are ended with psutil, after a grace of up to ``GRACE_S`` for
the requests in flight while serving; PyTriton's own ``stop()``, which waits for the lock its start
holds through waits of minutes, is not used, and its proxy threads are stopped with a bound.
:class:`ShutdownGuard` remains the last resort: should the teardown still overrun
``SHUTDOWN_LIMIT_S``, it dumps every thread's stack to stderr, ends the child processes, removes what
they leave and ends the process with the status it would have had.

The process side of that (signal handlers, ``LD_LIBRARY_PATH`` for PyTriton's Python-backend stub,
ending Triton's child processes and removing what they leave, :class:`ShutdownGuard`) lives in
:mod:`dsm_export.serving.lifecycle`; this module binds the models and runs the server.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import sys
import threading
from dataclasses import dataclass

import numpy as np

from .. import checks
from ..errors import DSMError
from ..core.hf import class_names as hf_class_names
from ..core.hf import is_hf_name
from ..core.models import sha256_file, transform_for
from ..engines.registry import RunnerOptions, backend_for, open_runner, read_engine
from .batcher import MicroBatcher  # noqa: F401  (the name callers import from here)
from .lifecycle import (  # noqa: F401  (ShutdownGuard, descendants: the names callers import from here)
    CLEAN_LIMIT_S, GRACE_S, SHUTDOWN_LIMIT_S, Interrupted, ShutdownGuard, descendants, detach_pytriton,
    end_tree, prepend_libdir, remove_leftovers, run_bounded, stop_on_signals)
from .triton_repo import model_name_for, refuse_random_init

MAX_IMAGE_BYTES = 32 << 20  # one encoded image; larger requests are refused
EXIT_TIMEOUT_S = 5  # Triton's wait for in-flight requests when stopping
START_ATTEMPTS = 3  # starts tried when a model fails to load (a PyTriton race under CPU load)


@dataclass(frozen=True)
class ServeOptions:
    """The server settings of :func:`serve` (the ``dsm-export serve`` options).

    Attributes:
        host: address Triton binds (HTTP, gRPC and metrics); loopback by default.
        http_port, grpc_port, metrics_port: ports, bind-tested before Triton starts.
        max_batch: largest batch of the raw model (and of the image micro-batcher).
        top_k: classes returned by ``<name>_image``.
        threads: ONNX Runtime intra-op threads per file (None: ONNX Runtime's default).
        image_instances: concurrent decoders of ``<name>_image``.
        allow_random_init: serve files exported without weights.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 32
    top_k: int = 5
    threads: int | None = None
    image_instances: int = 4
    allow_random_init: bool = False

    @property
    def ports(self) -> dict[str, int]:
        """The ports by protocol (``HTTP``, ``gRPC``, ``metrics``), as the messages name them."""
        return {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}


def class_names(model_name: str, classes: int) -> list[str] | None:
    """ImageNet class descriptions for a model whose classes are an ImageNet subset (offline, from
    timm's ``ImageNetInfo``); None when the model's classes are not ImageNet's."""
    import timm
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if is_hf_name(model_name):
        names = hf_class_names(model_name)
        return names if names and len(names) == classes else None
    try:
        subset = infer_imagenet_subset(timm.create_model(model_name, pretrained=False, num_classes=classes))
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != classes:
            return None
        return [info.index_to_description(i) for i in range(classes)]
    except Exception:  # noqa: BLE001 - no class names is a normal outcome
        return None


def make_image_infer(batcher, transform, output: str, top_k: int, names: list[str] | None):
    """The ``<name>_image`` inference callable: one encoded image -> top-k (or the embedding).

    Args:
        batcher: ``[1, 3, H, W]`` float32 -> ``[1, D]`` (a :class:`MicroBatcher` over the ONNX runner).
        transform: timm eval transform (PIL image -> ``[3, H, W]`` tensor).
        output: the ONNX file's output name: ``logits`` gives top-k, anything else is passed through.
        top_k: classes returned.
        names: class names, or None.
    """
    from PIL import Image, UnidentifiedImageError
    from pytriton.exceptions import PyTritonBadParameterError

    def infer(requests):
        responses = []
        for request in requests:
            data = request["image"].reshape(-1)
            if data.size != 1:
                raise PyTritonBadParameterError(f"send exactly one encoded image per request, got {data.size}")
            raw = bytes(data[0])
            if len(raw) > MAX_IMAGE_BYTES:
                raise PyTritonBadParameterError(f"the image is {len(raw)} bytes, over the {MAX_IMAGE_BYTES} limit")
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    pixels = transform(im.convert("RGB")).unsqueeze(0).numpy()
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                raise PyTritonBadParameterError(f"the bytes are not a JPEG/PNG image ({exc})") from None
            y = batcher(pixels)[0]
            if output != "logits":
                responses.append({output: y.astype(np.float32)})
                continue
            logits = y.astype(np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            idx = np.argsort(-probs, kind="stable")[:top_k]
            resp = {"top_k_indices": idx.astype(np.int64), "top_k_scores": probs[idx].astype(np.float32)}
            if names is not None:
                resp["top_k_names"] = np.array([names[i].encode() for i in idx], dtype=object)
            responses.append(resp)
        return responses

    return infer


def _set_parameters(triton, model_name: str, parameters: dict[str, str]) -> None:
    """Add string ``parameters`` to a bound model's Triton config (PyTriton has no public hook for it)."""
    for model in triton._model_manager.models:  # noqa: SLF001
        if model.model_name == model_name:
            model._get_triton_model_config().backend_parameters.update(parameters)  # noqa: SLF001


class _BadRequestLogFilter(logging.Filter):
    """Shorten PyTriton's log of a request refused for bad input (a client's mistake, not a server
    fault) from a traceback to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None and "PyTritonBadParameterError" in str(record.msg) + str(record.args):
            text = record.getMessage()
            record.msg, record.args = "bad request refused: %s", (text.strip().splitlines()[-1],)
        return True


def _bind(triton, onnx_path: str, name: str, options: ServeOptions, batchers: list) -> str:
    """Bind ``<name>`` and ``<name>_image`` for one ONNX file; returns a one-line description."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    max_batch, top_k = options.max_batch, options.top_k
    runner = open_runner(onnx_path, RunnerOptions(threads=options.threads))  # any backend's engine
    engine = runner.engine_file
    info, in_name, out_name, dims = engine.info, engine.input_name, engine.output_name, engine.output_dims
    transform = transform_for(info.model, info.num_classes)
    c, h, w = info.input_size
    limit = info.batch or max_batch
    params = {"dsm.file": os.path.abspath(onnx_path), "dsm.sha256": sha256_file(onnx_path), "dsm.model": info.model,
              "dsm.schedule": info.schedule.spec(), "dsm.weights_sha256": info.weights_sha256,
              "dsm.output": out_name}

    @batch
    def infer_raw(**inputs):
        return {out_name: runner(inputs[in_name]).astype(np.float32)}

    triton.bind(
        model_name=name, infer_func=infer_raw,
        inputs=[Tensor(name=in_name, dtype=np.float32, shape=(c, h, w))],
        outputs=[Tensor(name=out_name, dtype=np.float32, shape=dims)],
        config=ModelConfig(max_batch_size=limit, batcher=DynamicBatcher(
            max_queue_delay_microseconds=2000, preferred_batch_size=[b for b in (8, 16, 32) if b <= limit])),
        strict=True,
    )
    batcher = MicroBatcher(runner, limit)
    batchers.append(batcher)
    if out_name == "logits":
        names = class_names(info.model, dims[-1])
        outputs = [Tensor(name="top_k_indices", dtype=np.int64, shape=(top_k,)),
                   Tensor(name="top_k_scores", dtype=np.float32, shape=(top_k,))]
        if names is not None:
            outputs.append(Tensor(name="top_k_names", dtype=bytes, shape=(top_k,)))
    else:
        names = None
        outputs = [Tensor(name=out_name, dtype=np.float32, shape=dims)]
    infer_image = make_image_infer(batcher, transform, out_name, top_k, names)
    triton.bind(
        model_name=f"{name}_image", infer_func=[infer_image] * options.image_instances,
        inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
        outputs=outputs,
        config=ModelConfig(batching=False),
        strict=True,
    )
    _set_parameters(triton, name, params)
    _set_parameters(triton, f"{name}_image", params)
    return f"{name} ({info.model}, schedule {info.schedule.spec()}, sha256 {params['dsm.sha256'][:12]})"


def check_serve_args(onnx_paths: list[str], names: list[str] | None, options: ServeOptions) -> list[str]:
    """Everything ``serve`` can check before Triton starts; returns the model names.

    Raises:
        DSMError: missing or foreign files, bad names, a random-init export (unless allowed), a port
            in use or out of range, bad sizes, PyTriton missing.
    """
    top_k = options.top_k
    if options.max_batch < 1 or top_k < 1 or options.image_instances < 1:
        raise DSMError("--max-batch, --top-k and --image-instances must be at least 1")
    for path in onnx_paths:
        checks.input_file(path, "engine")
        backend = backend_for(path)
        if backend.preflight is not None:
            backend.preflight(path)
        if backend.needs_gpu:  # a GPU, and the runtime that built it, before Triton starts
            open_runner(path).close()
        engine = read_engine(path)
        if engine.output_name == "logits" and top_k > engine.output_dims[-1]:
            raise DSMError(f"--top-k {top_k} is more than the {engine.output_dims[-1]} classes of {path!r}")
    if not options.allow_random_init:
        refuse_random_init(onnx_paths, "serve")
    names = names or [model_name_for(p) for p in onnx_paths]
    if len(names) != len(onnx_paths) or len(set(names)) != len(names):
        raise DSMError(f"need one distinct model name per file, got {names}")
    checks.ports_free(options.host, options.ports)
    try:
        import pytriton.triton  # noqa: F401
    except ImportError:
        raise DSMError("serve needs PyTriton: pip install 'dsm-export[serve]'") from None
    return names


def serve(onnx_paths: list[str], names: list[str] | None = None, options: ServeOptions | None = None,
          stop: threading.Event | None = None) -> int:
    """Start Triton on ``host`` serving each ONNX file, until SIGINT/SIGTERM; stop cleanly.

    Must run in the main thread (it installs SIGINT/SIGTERM handlers). Prints one ``...: ready`` line
    once every model is loaded, ``stopped`` at the end. A signal is acted on at once, at any phase;
    the teardown takes about a second (up to ``GRACE_S`` more while serving, for requests in flight).

    Args:
        onnx_paths: ONNX files written by dsm-export (e.g. a DSM export and the ``none`` baseline).
        names: model names (default: from the file names).
        options: the server settings (:class:`ServeOptions`: host, ports, batch, top-k, threads,
            image instances, random init); None for the defaults (loopback, ports 8000-8002).
        stop: an event that stops the server when set (the signal handlers set it too); the CLI
            passes one it watched while importing.

    Returns:
        0 after a clean shutdown (by signal, at any phase).

    Raises:
        DSMError: everything :func:`check_serve_args` raises, or Triton failing to start.
    """
    options = options or ServeOptions()
    host, http_port, grpc_port, metrics_port = options.host, options.http_port, options.grpc_port, options.metrics_port
    stop = stop or threading.Event()
    triton, workspace, ready = None, None, False
    batchers: list[MicroBatcher] = []
    # Handlers first: a signal then interrupts the checks and the binding, or is seen within 0.2 s.
    with stop_on_signals(stop) as signals:
        try:
            with signals.interruptible():
                names = check_serve_args(onnx_paths, names, options)
                from pytriton.constants import PYTRITON_HOME
                from pytriton.triton import Triton, TritonConfig

            prepend_libdir()
            logging.getLogger("pytriton.proxy.inference").addFilter(_BadRequestLogFilter())
            config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                                  metrics_address=host, metrics_port=metrics_port, log_verbose=0,
                                  exit_timeout_secs=EXIT_TIMEOUT_S)
            os.makedirs(PYTRITON_HOME, exist_ok=True)
            for attempt in range(START_ATTEMPTS):
                # Our own workspace path, so that it is removed whatever phase a signal interrupts.
                workspace = os.path.join(PYTRITON_HOME, f"dsm-serve-{os.getpid()}-{secrets.token_hex(4)}")
                with signals.interruptible():  # seconds of work, and nothing runs yet
                    triton = Triton(config=config, workspace=workspace)
                    served = [_bind(triton, p, n, options, batchers) for p, n in zip(onnx_paths, names)]
                if _start(triton, stop, (http_port, grpc_port, metrics_port), host, attempt < START_ATTEMPTS - 1):
                    break
                _teardown(triton, batchers, workspace)
                triton, workspace, batchers = None, None, []
            if stop.is_set():
                raise Interrupted("stopped while starting")
            print(f"serving {'; '.join(served)} with <name>_image models, on http://{host}:{http_port} "
                  f"and grpc {host}:{grpc_port}: ready", flush=True)
            ready = True
            while not stop.wait(0.2):
                if not triton.is_alive():
                    raise DSMError("Triton stopped on its own (see its log above)")
            print("shutting down", flush=True)
        except Interrupted:
            print("interrupted while starting: shutting down", flush=True)
        finally:
            # 0 after a signal; 1 when an error is on its way out (Triton died, or failed to start).
            # The teardown is bounded itself; the guard is a last resort (it dumps every stack).
            guard = ShutdownGuard(SHUTDOWN_LIMIT_S, 0 if stop.is_set() else 1, workspace, "stopping Triton")
            try:
                _teardown(triton, batchers, workspace, GRACE_S if ready else 0.0)
            finally:
                guard.cancel()
    _report(batchers)
    print("stopped", flush=True)
    sys.stdout.flush()
    return 0


def _report(batchers: list) -> None:
    """Print how the image models' micro-batchers grouped their images (nothing when none ran)."""
    if batchers and any(b.runs for b in batchers):
        runs, items = sum(b.runs for b in batchers), sum(b.items for b in batchers)
        print(f"image models: {items} images in {runs} network runs ({items / runs:.2f} per run)", flush=True)


def _teardown(triton, batchers: list, workspace: str | None, grace_s: float = 0.0) -> None:
    """Stop Triton, every child process, PyTriton's proxy threads and the micro-batchers; remove the
    workspace and what Triton leaves in /tmp and /dev/shm.

    PyTriton's own ``Triton.stop()`` is not called: it first takes the lock that ``connect()`` holds
    while it waits for the server and the models (up to 120 s and 60 s per model), so a stop during
    the start waited for those (:func:`~dsm_export.serving.lifecycle.detach_pytriton`). Instead the
    process tree is ended with psutil (:func:`~dsm_export.serving.lifecycle.end_tree`), then the proxy
    threads stopped with a bound. At most about ``grace_s + 2 * KILL_WAIT_S + CLEAN_LIMIT_S`` seconds;
    about one second plus the grace used when nothing goes wrong.

    Args:
        triton: PyTriton's ``Triton``, or None when none was made.
        batchers: the micro-batchers to close.
        workspace: PyTriton's workspace folder, or None.
        grace_s: seconds Triton is given after SIGINT to answer the requests in flight (while serving;
            0 while starting: everything is killed at once).
    """
    server_pid, server = detach_pytriton(triton) if triton is not None else (None, None)
    logs = getattr(server, "logs", None)
    # Triton logs this once no request is in flight; what follows (unloading) is not waited for.
    drained = (lambda: "All models are stopped" in logs()) if logs is not None else None
    folders = end_tree(server_pid, grace_s, drained)
    models = list(triton._model_manager.models) if triton is not None else []  # noqa: SLF001

    def close():
        for stop_one in [*(b.close for b in batchers), *(m.clean for m in models)]:
            try:
                stop_one()
            except Exception:  # noqa: BLE001 - stopping what may be half started
                pass

    run_bounded(close, CLEAN_LIMIT_S, "dsm-serve-teardown")
    remove_leftovers(folders, workspace)


def _start(triton, stop: threading.Event, ports: tuple[int, int, int], host: str, retry: bool = False) -> bool:
    """Start Triton, then wait for it and load the models in a thread, so that the main thread
    sees a signal at once and a Triton process that exits while starting (e.g. a port taken
    between the bind test and the start) is reported at once, not after PyTriton's 120 s wait.
    Nothing is started when ``stop`` is already set.

    Args:
        triton: PyTriton's ``Triton`` with its models bound.
        stop: the event a signal sets.
        ports: HTTP, gRPC and metrics ports, for the message.
        host: Triton's address, for the message.
        retry: a model that failed to load returns False (the caller starts again) instead of raising.

    Returns:
        True when Triton runs with its models loaded, or when ``stop`` was set (the caller ends
        Triton; the thread's waits run out in the background); False for a retry.

    Raises:
        DSMError: Triton exited or failed while starting.
    """
    if stop.is_set():
        return True
    failure: list[BaseException] = []
    # The Triton process is started from the main thread: PyTriton gives it PR_SET_PDEATHSIG, which
    # fires when the *thread* that started it ends.
    triton._run_server()  # noqa: SLF001 - Triton.run() is _run_server() then connect()

    def run():
        try:
            triton.connect()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="dsm-triton-start", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if stop.is_set():
            return True
        server = getattr(triton, "_triton_server", None)
        if server is not None and getattr(server, "_tritonserver_running_cmd", None) is not None \
                and not server.is_alive():
            break
    if failure or not triton.is_alive():
        why = f": {str(failure[0]).splitlines()[0]}" if failure and str(failure[0]) else ""
        message = (f"Triton exited while starting{why} (see its log above; are ports "
                   f"{', '.join(map(str, ports))} on {host} free?)")
        if retry and "load failed" in message:
            # PyTriton's later instances of a model wait 1 s for the first one's handshake socket;
            # on a loaded machine that can fail a model load. Start again.
            print(f"a model failed to load ({message[:120]}...): starting again", flush=True)
            return False
        raise DSMError(message)
    return True
