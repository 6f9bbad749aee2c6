"""Subcommand ``serve``: a real Triton server (PyTriton), on loopback unless ``--host`` says otherwise."""

from __future__ import annotations

import os
import signal
import threading

from ..serving.lifecycle import exit_process


def add(sub):
    p = sub.add_parser("serve", help="serve ONNX files with a real Triton server (PyTriton), on loopback by default")
    p.add_argument("onnx", nargs="+", help="ONNX files (e.g. the DSM export and the none baseline) or OpenVINO IRs (.xml)")
    p.add_argument("--name", action="append", help="model name per file (default: from the file name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind HTTP, gRPC and metrics (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--image-instances", type=int, default=4,
                   help="concurrent image decoders of each <name>_image model (default 4)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="serve files exported without --weights (refused by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``serve`` until SIGINT/SIGTERM; its exit status (0 after a signal at any phase). Run as the
    command (``args.owns_process``), the process ends here (:func:`~dsm_export.serving.lifecycle.exit_process`)."""
    # Run as the command, a signal during the seconds of imports below ends it at once: nothing
    # has been started yet. After them (or called in-process), the handler only sets ``stop``, which
    # serve() watches.
    stop = threading.Event()
    importing = getattr(args, "owns_process", False)

    def on_signal(signum, frame):
        stop.set()
        if importing:
            print("interrupted while starting: stopped", flush=True)
            os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    from ..serving.serve import ServeOptions, serve

    importing = False
    if stop.is_set():
        print("interrupted while starting: stopped", flush=True)
        code = 0
    else:
        options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                               metrics_port=args.metrics_port, max_batch=args.max_batch, top_k=args.top_k,
                               threads=args.threads, image_instances=args.image_instances,
                               allow_random_init=args.allow_random_init)
        code = serve(args.onnx, names=args.name, options=options, stop=stop)
    if getattr(args, "owns_process", False):
        exit_process(code)  # the work is done and cleaned up: no seconds of interpreter finalization
    return code
