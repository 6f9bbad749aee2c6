"""Serve a DSM ONNX file with a real Triton Inference Server through PyTriton, on loopback.

Two models:

* ``<name>``: ``pixel_values`` ``[B, 3, H, W]`` FP32 -> ``logits`` ``[B, classes]`` FP32, run by ONNX
  Runtime, with dynamic batching (HTTP and gRPC).
* ``<name>_image``: ``image`` (one encoded JPEG/PNG, BYTES) -> ``top_k_indices`` INT64 and
  ``top_k_scores`` FP32 (softmax), preprocessed with the model's timm eval transform.

Triton validates shapes and dtypes against the model config and answers a bad request with an
error for that request only; bytes that are no image get a ``PyTritonBadParameterError`` for that
request. SIGINT or SIGTERM stops the server cleanly (exit 0).

PyTriton's Python-backend stub loads the system's libpython, so the server is started with
``LD_LIBRARY_PATH`` led by ``sysconfig.get_config_var("LIBDIR")``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import sysconfig
import time

import numpy as np

from .errors import DSMError
from .export import load_onnx, read_metadata
from .triton_repo import model_name_for


def _prepend_libdir() -> None:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = libdir + (os.pathsep + current if current else "")


def make_image_infer(runner, transform, top_k: int):
    """The ``<name>_image`` inference callable: encoded image bytes -> top-k indices and scores."""
    from PIL import Image, UnidentifiedImageError
    from pytriton.exceptions import PyTritonBadParameterError

    def infer(requests):
        responses = []
        for request in requests:
            data = request["image"].reshape(-1)
            if data.size != 1:
                raise PyTritonBadParameterError("send exactly one encoded image per request")
            try:
                with Image.open(io.BytesIO(bytes(data[0]))) as im:
                    pixels = transform(im.convert("RGB")).unsqueeze(0).numpy()
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise PyTritonBadParameterError(f"the bytes are not a JPEG/PNG image ({exc})") from None
            logits = runner(pixels)[0].astype(np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            idx = np.argsort(-probs, kind="stable")[:top_k]
            responses.append({"top_k_indices": idx.astype(np.int64), "top_k_scores": probs[idx].astype(np.float32)})
        return responses

    return infer


def _bind(triton, onnx_path: str, name: str, max_batch: int, top_k: int, threads: int | None) -> str:
    """Bind ``<name>`` (logits) and ``<name>_image`` (top-k from encoded bytes) for one ONNX file."""
    import timm
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    from .data import eval_transform
    from .validate import onnx_runner

    model = load_onnx(onnx_path)
    info = read_metadata(model, onnx_path)
    runner = onnx_runner(onnx_path, threads)
    transform = eval_transform(timm.create_model(info.model, pretrained=False))
    c, h, w = info.input_size
    classes = int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    limit = info.batch or max_batch

    @batch
    def infer_logits(pixel_values):
        return {"logits": runner(pixel_values).astype(np.float32)}

    triton.bind(
        model_name=name, infer_func=infer_logits,
        inputs=[Tensor(name="pixel_values", dtype=np.float32, shape=(c, h, w))],
        outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
        config=ModelConfig(max_batch_size=limit, batcher=DynamicBatcher(
            max_queue_delay_microseconds=2000, preferred_batch_size=[b for b in (8, 16, 32) if b <= limit])),
        strict=True,
    )
    triton.bind(
        model_name=f"{name}_image", infer_func=make_image_infer(runner, transform, top_k),
        inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="top_k_indices", dtype=np.int64, shape=(top_k,)),
                 Tensor(name="top_k_scores", dtype=np.float32, shape=(top_k,))],
        config=ModelConfig(batching=False),
        strict=True,
    )
    return f"{name} ({info.model}, schedule {info.schedule.spec()})"


def serve(onnx_paths: list[str], names: list[str] | None = None, http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 32, top_k: int = 5, threads: int | None = None) -> int:
    """Start Triton on 127.0.0.1 serving each ONNX file, until SIGINT/SIGTERM; stop cleanly.

    Args:
        onnx_paths: ONNX files written by dsm-export (e.g. a DSM export and the ``none`` baseline).
        names: model names (default: from the file names).

    Returns:
        0 after a clean shutdown.

    Raises:
        DSMError: bad ONNX file, duplicate names, or PyTriton missing.
    """
    for path in onnx_paths:
        read_metadata(load_onnx(path), path)
    names = names or [model_name_for(p) for p in onnx_paths]
    if len(names) != len(onnx_paths) or len(set(names)) != len(names):
        raise DSMError(f"need one distinct model name per file, got {names}")
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise DSMError("serve needs PyTriton: pip install 'dsm-export[serve]'") from None

    _prepend_libdir()
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_address="127.0.0.1", metrics_port=metrics_port,
                          log_verbose=0)
    with Triton(config=config) as triton:
        served = [_bind(triton, p, n, max_batch, top_k, threads) for p, n in zip(onnx_paths, names)]
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        triton.run()
        print(f"serving {'; '.join(served)} with <name>_image models, on http://127.0.0.1:{http_port} "
              f"and grpc 127.0.0.1:{grpc_port}: ready", flush=True)
        while not stop["now"]:
            time.sleep(0.2)
        print("shutting down", flush=True)
    print("stopped", flush=True)
    sys.stdout.flush()
    return 0
