#!/usr/bin/env python3
"""Load test of a running `dsm-export serve`: N concurrent clients for a bounded time per model.

Each client thread sends one image per request (the shared photos, preprocessed once) over HTTP to
the named model until the time is up, then the next model is measured the same way. Reports
throughput (images/s), p50 and p99 latency (ms) and the error count per model. Only loopback
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


def run_clients(url: str, model: str, batches: list[np.ndarray], clients: int, seconds: float) -> dict:
    """Bounded closed-loop load: ``clients`` threads, ``seconds`` each; returns the figures."""
    import tritonclient.http as httpclient

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(k: int):
        client = httpclient.InferenceServerClient(url, connection_timeout=30, network_timeout=60)
        i = k
        while time.perf_counter() < deadline:
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
                    errors[0] += 1
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
        "model": model, "requests": len(lat), "errors": errors[0],
        "throughput": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port of the server (loopback)")
    parser.add_argument("--models", default="dsm,none", help="comma-separated model names")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="time per model (at most 300)")
    parser.add_argument("--images", default=os.path.join(os.environ.get("DSM_SHARED", "../shared"),
                                                          "data", "imagenet-sample"))
    parser.add_argument("--model-name", default="deit_tiny_patch16_224", help="timm model for preprocessing")
    args = parser.parse_args(argv)
    host = args.url.rsplit(":", 1)[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"load_test: error: {host} is not a loopback address", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 300 or not 1 <= args.clients <= 64:
        print("load_test: error: need 0 < --seconds <= 300 and 1 <= --clients <= 64", file=sys.stderr)
        return 2
    import timm

    from dsm_export.data import eval_transform, list_images, load_batch

    images = list_images(args.images, limit=64)
    transform = eval_transform(timm.create_model(args.model_name, pretrained=False))
    batches = [load_batch(images, [i], transform).numpy() for i in range(len(images))]
    print(f"{args.clients} concurrent clients, {args.seconds:.0f} s per model, 1 image per request, "
          f"{os.cpu_count()} CPUs")
    print("| model | requests | errors | throughput (img/s) | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        r = run_clients(args.url, model, batches, args.clients, args.seconds)
        print(f"| {r['model']} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
