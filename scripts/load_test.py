#!/usr/bin/env python3
"""Load test of a running `dsm-export serve`: N concurrent clients for a bounded time per model.

Each client thread sends one image per request (the shared photos, preprocessed once) over HTTP to
the named model until the time is up, then the next model is measured the same way. Reports
throughput (images/s of good requests), p50 and p99 latency (ms) and the error count per model.
With ``--bad-every K`` every K-th request of each client is a bad one instead (cycling through a
wrong shape, a wrong dtype, a batch over the model's maximum, an unknown input name, and bytes that
are no image sent to ``<model>_image``): bad requests are counted apart, as answered with an error
(expected) or accepted (a fault), and the server's liveness is checked after the load. Only loopback
addresses are accepted.

    dsm-export serve out/deit_tiny_dsm.onnx out/deit_tiny_none.onnx --name dsm --name none &
    python scripts/load_test.py --url 127.0.0.1:8000 --models dsm,none --clients 8 --seconds 20
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
import time

import numpy as np

BAD_KINDS = ("wrong shape", "wrong dtype", "batch over max", "unknown input", "bytes no image")


def bad_request(client, httpclient, model: str, kind: str, max_batch: int):
    """Send one bad request of ``kind``; returns True if the server answered it with an error."""
    from tritonclient.utils import InferenceServerException

    if kind == "bytes no image":
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"these bytes are no image"], dtype=object))
        target = f"{model}_image"
    else:
        shape, dtype, name = {
            "wrong shape": ((1, 3, 200, 224), "FP32", "pixel_values"),
            "wrong dtype": ((1, 3, 224, 224), "FP64", "pixel_values"),
            "batch over max": ((max_batch + 1, 3, 224, 224), "FP32", "pixel_values"),
            "unknown input": ((1, 3, 224, 224), "FP32", "pixels"),
        }[kind]
        inp = httpclient.InferInput(name, list(shape), dtype)
        inp.set_data_from_numpy(np.zeros(shape, np.float64 if dtype == "FP64" else np.float32))
        target = model
    try:
        client.infer(target, [inp])
        return False
    except InferenceServerException:
        return True


def run_clients(url: str, model: str, batches: list[np.ndarray], clients: int, seconds: float,
                bad_every: int = 0) -> dict:
    """Bounded closed-loop load: ``clients`` threads, ``seconds`` each; returns the figures.

    Returns:
        ``{"model", "requests", "errors", "bad", "bad_answered", "bad_accepted", "throughput"
        (good images/s), "p50_ms", "p99_ms"}`` (latencies of good requests only).
    """
    import tritonclient.http as httpclient

    latencies: list[float] = []
    counts = {"errors": 0, "bad": 0, "bad_answered": 0}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    max_batch = 0
    if bad_every:
        meta = httpclient.InferenceServerClient(url)
        max_batch = int(meta.get_model_config(model).get("max_batch_size", 0))
        meta.close()

    def client_loop(k: int):
        client = httpclient.InferenceServerClient(url, connection_timeout=30, network_timeout=60)
        i = k
        sent = 0
        while time.perf_counter() < deadline:
            sent += 1
            if bad_every and sent % bad_every == 0:
                kind = BAD_KINDS[(sent // bad_every + k) % len(BAD_KINDS)]
                try:
                    answered = bad_request(client, httpclient, model, kind, max_batch)
                except Exception:  # noqa: BLE001 - a broken connection is no answer
                    answered = False
                with lock:
                    counts["bad"] += 1
                    counts["bad_answered"] += answered
                continue
            x = batches[i % len(batches)]
            inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            start = time.perf_counter()
            try:
                client.infer(model, [inp])
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    counts["errors"] += 1
            i += clients
        client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "model": model, "requests": len(lat), **counts,
        "bad_accepted": counts["bad"] - counts["bad_answered"],
        "throughput": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def server_alive(url: str) -> bool:
    """Whether the server answers ``is_server_live`` and ``is_server_ready``."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        return client.is_server_live() and client.is_server_ready()
    except Exception:  # noqa: BLE001 - gone
        return False
    finally:
        client.close()


def build_parser() -> argparse.ArgumentParser:
    """The script's argparse parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port of the server (loopback)")
    parser.add_argument("--models", default="dsm,none", help="comma-separated model names")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="time per model (at most 300)")
    parser.add_argument("--bad-every", type=int, default=0,
                        help="make every K-th request of each client a bad one (0: none)")
    parser.add_argument("--images", default=os.path.join(os.environ.get("DSM_SHARED", "../shared"),
                                                          "data", "imagenet-sample"))
    parser.add_argument("--model-name", default="deit_tiny_patch16_224", help="timm model for preprocessing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    host = args.url.rsplit(":", 1)[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"load_test: error: {host} is not a loopback address", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 300 or not 1 <= args.clients <= 64 or args.bad_every < 0:
        print("load_test: error: need 0 < --seconds <= 300, 1 <= --clients <= 64, --bad-every >= 0",
              file=sys.stderr)
        return 2
    import timm

    from dsm_export.data import eval_transform, list_images, load_batch

    images = list_images(args.images, limit=64)
    transform = eval_transform(timm.create_model(args.model_name, pretrained=False))
    batches = [load_batch(images, [i], transform).numpy() for i in range(len(images))]
    print(f"{args.clients} concurrent clients, {args.seconds:.0f} s per model, 1 image per request, "
          f"{os.cpu_count()} CPUs" + (f", every {args.bad_every}th request bad" if args.bad_every else ""))
    if args.bad_every:
        print("| model | good requests | good errors | bad requests | bad answered with an error | bad accepted "
              "| throughput (img/s) | p50 (ms) | p99 (ms) |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| model | requests | errors | throughput (img/s) | p50 (ms) | p99 (ms) |")
        print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        r = run_clients(args.url, model, batches, args.clients, args.seconds, args.bad_every)
        bad = f" {r['bad']} | {r['bad_answered']} | {r['bad_accepted']} |" if args.bad_every else ""
        print(f"| {r['model']} | {r['requests']} | {r['errors']} |{bad} {r['throughput']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)
    if args.bad_every:
        print(f"server alive after the load: {'yes' if server_alive(args.url) else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
