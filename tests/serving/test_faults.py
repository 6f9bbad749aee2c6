"""Fault injection: user mistakes found before any work, and a live server under bad requests and signals.

Everything here is real: the CLI in-process or as a subprocess, a real Triton server (PyTriton) on
free loopback ports, real requests through tritonclient and raw HTTP.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import psutil
import pytest

from dsm_export.cli import main

from conftest import DEIT, ROOT
from servers import Server, alive, descendants, free_ports, own_workspaces, start_ready, workspaces


# A Python traceback through dsm-export's own code (Triton's and PyTriton's logs of refused
# requests quote tracebacks of the model stub; those are not faults of the server).
OWN_TRACEBACK = re.compile(r'^Traceback \(most recent call last\):\n  File "[^"\n]*/dsm_export/', re.M)


# ------------------------------------------------------------------ mistakes found before any work
def _fails_fast(args, capsys, match, limit_s=10.0):
    start = time.monotonic()
    code = main(args)
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("dsm-export: error:"), err
    assert match in err, err
    assert "PASS" not in captured.out
    assert elapsed < limit_s, f"took {elapsed:.1f} s"
    return err


@pytest.fixture
def empty_dir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_validate_json_into_missing_folder_fails_before_validating(dsm_onnx, images_dir, empty_dir, capsys):
    _fails_fast(["validate", dsm_onnx, "--images", images_dir, "--json", str(empty_dir / "missing/dir/r.json")],
                capsys, "does not exist")
    assert list(empty_dir.iterdir()) == []


def test_every_subcommand_checks_its_outputs_first(dsm_onnx, weights, images_dir, empty_dir, capsys):
    missing = str(empty_dir / "no" / "such")
    a_file = empty_dir / "a_file"
    a_file.write_text("x")
    image = os.path.join(images_dir, sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[0])
    cases = [
        (["inspect", dsm_onnx, "--json", missing + "/i.json"], "does not exist"),
        (["visualize", DEIT, "--weights", weights, "--image", image, "--schedule", "r=8", "--blocks", "3",
          "-o", missing + "/v.png"], "does not exist"),
        (["export", DEIT, "--weights", weights, "-o", missing + "/m.onnx"], "does not exist"),
        (["build", dsm_onnx, "--backend", "onnxruntime", "-o", missing + "/b.onnx"], "does not exist"),
        (["triton-repo", dsm_onnx, "-o", str(a_file / "repo")], "is a file"),
        (["analyze", DEIT, "--weights", weights, "--images", images_dir, "-o", str(a_file)], "is a file"),
        (["tune", DEIT, "--weights", weights, "--images", images_dir, "--target-flops-ratio", "1.7",
          "--report", missing + "/r.json"], "does not exist"),
        (["validate", dsm_onnx, "--images", images_dir, "--json", str(empty_dir)], "is a folder"),
    ]
    for args, match in cases:
        _fails_fast(args, capsys, match)
    assert sorted(p.name for p in empty_dir.iterdir()) == ["a_file"]


@pytest.fixture
def bad_images(images_dir, tmp_path):
    """3 good photos, a truncated JPEG and a text file named .jpg."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    names = sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[:3]
    for name in names:
        shutil.copy(os.path.join(images_dir, name), folder)
    with open(os.path.join(images_dir, names[0]), "rb") as fh:
        data = fh.read()
    (folder / "zz_truncated.JPEG").write_bytes(data[: len(data) // 3])
    (folder / "zz_text.jpg").write_text("not an image")
    return folder


def test_unreadable_images_are_found_up_front(dsm_onnx, weights, bad_images, tmp_path, capsys):
    report = tmp_path / "r.json"
    err = _fails_fast(["validate", dsm_onnx, "--images", str(bad_images), "--json", str(report)], capsys,
                      "2 of 5 images")
    assert "--skip-unreadable" in err and not report.exists()
    _fails_fast(["analyze", DEIT, "--weights", weights, "--images", str(bad_images), "-o", str(tmp_path / "a")],
                capsys, "2 of 5 images")
    _fails_fast(["tune", DEIT, "--weights", weights, "--images", str(bad_images), "--target-flops-ratio", "1.7",
                 "--calibration", "2"], capsys, "2 of 5 images")
    assert not (tmp_path / "a").exists()


def test_skip_unreadable_continues_and_counts(dsm_onnx, bad_images, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["validate", dsm_onnx, "--images", str(bad_images), "--json", str(report), "--skip-unreadable",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out and "skipped:                  2 unreadable images" in out
    data = json.loads(report.read_text())
    assert data["images"] == 3 and sorted(data["skipped_unreadable"]) == ["zz_text.jpg", "zz_truncated.JPEG"]


def test_random_init_export_is_refused_by_triton_repo_and_serve(dsm_onnx, tmp_path, capsys):
    model = onnx.load(dsm_onnx)
    for p in model.metadata_props:
        if p.key in ("dsm.weights", "dsm.weights_sha256"):
            p.value = ""
    random_init = str(tmp_path / "random.onnx")
    onnx.save(model, random_init)
    _fails_fast(["triton-repo", random_init, "-o", str(tmp_path / "repo")], capsys, "--allow-random-init")
    _fails_fast(["serve", random_init, "--http-port", "1"], capsys, "--allow-random-init")
    assert not (tmp_path / "repo").exists()


# ------------------------------------------------------------------ serve: ports and signals
# Seconds after the start, and two moments keyed to what runs (on a loaded machine the seconds may all
# land before Triton starts): the tritonserver process started, PyTriton waiting for it (where
# PyTriton's stop waited 60 s for its start lock, then the stacks were dumped), and the first
# Python-backend stub started, a model loading (where a stub outlived the server).
SIGTERM_MOMENTS = [1, 3, 6, 12, "tritonserver", "triton_python_backend_stub"]
STOP_LIMIT_S = 10.0  # an orchestrator's grace before SIGKILL is often 30 s; serve must be well inside


def _serve_cli(args, timeout):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dsm_export", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def test_busy_http_port_exits_2_within_seconds(dsm_onnx):
    before = workspaces()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        grpc, metrics = free_ports(2)
        proc, elapsed = _serve_cli([dsm_onnx, "--http-port", str(port), "--grpc-port", str(grpc),
                                    "--metrics-port", str(metrics)], timeout=60)
    assert proc.returncode == 2 and elapsed < 30, (proc.returncode, elapsed)
    assert proc.stderr.strip().splitlines() == [
        f"dsm-export: error: HTTP port {port} on 127.0.0.1 is already in use (choose another with --http-port)"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not [w for w in workspaces() - before if w.startswith("dsm-serve-")]  # none was made


def test_host_this_machine_does_not_have_exits_2(dsm_onnx):
    proc, _ = _serve_cli([dsm_onnx, "--host", "192.0.2.1", *sum(
        ([f"--{k}-port", str(p)] for k, p in zip(("http", "grpc", "metrics"), free_ports(3))), [])], timeout=60)
    assert proc.returncode == 2 and "cannot bind" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _stop_and_check(srv, sig, before, timeout=30):
    """Signal the server, then: exit within ``timeout`` s with 0 (or, for a SIGTERM that lands before
    the handlers are installed, death by the signal: -15 from Popen, 143 through a shell), every
    child process gone, no new PyTriton workspace."""
    children = descendants(srv.proc.pid)
    start = time.monotonic()
    srv.signal(sig)
    code = srv.proc.wait(timeout=timeout)
    elapsed = time.monotonic() - start
    assert code in (0, 143, -signal.SIGTERM) if sig == signal.SIGTERM else code == 0, (code, srv.log()[-2000:])
    deadline = time.monotonic() + 10  # the kernel reaps orphans (PDEATHSIG) asynchronously
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in children if alive(p)], "child processes left running"
    assert not own_workspaces(srv.proc.pid, before), "PyTriton workspace left behind"
    assert not OWN_TRACEBACK.search(srv.log()), srv.log()[-3000:]
    return elapsed


def _running(proc: psutil.Process) -> bool:
    """Whether ``proc`` runs (a zombie counts as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Tree:
    """Every process seen under ``pid`` while it runs (psutil objects, so that a reused pid is not
    taken for one of them), listed every 50 ms by a thread until :meth:`close`."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}
        self.names: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.05):
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                return
            for child in children:  # names read on every listing: a child is first seen before its exec
                self.seen.setdefault(child.pid, child)
                with contextlib.suppress(psutil.Error):
                    self.names.add(child.name())

    def wait_for(self, name: str, timeout: float = 240) -> None:
        """Wait until a process named ``name`` has been seen under the root (the kernel keeps 15
        characters of a name, which then match as a prefix)."""
        deadline = time.monotonic() + timeout
        while not any(n == name or (len(n) == 15 and name.startswith(n)) for n in set(self.names)):
            assert _running(self.root) and time.monotonic() < deadline, f"no {name} process appeared"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def running(self, grace_s: float = 5.0) -> list[str]:
        """Those seen that still run after up to ``grace_s`` seconds."""
        deadline = time.monotonic() + grace_s
        while any(_running(p) for p in self.seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [f"{p.pid} {p.name()}" for p in self.seen.values() if _running(p)]


def _left_behind(pid: int) -> list[str]:
    """What server ``pid`` may leave outside its workspace: processes naming its PyTriton shared
    memory (stubs no longer under it), the segments in /dev/shm, Triton's model folders in /tmp."""
    marker = f"pytrtion{pid}-"
    found = [f"process {p.pid}" for p in psutil.process_iter(["cmdline"])
             if any(marker in a for a in p.info["cmdline"] or ())]
    if os.path.isdir("/dev/shm"):
        found += [f"/dev/shm/{e}" for e in os.listdir("/dev/shm") if e.startswith(marker)]
    tmp = tempfile.gettempdir()
    for entry in (e for e in os.listdir(tmp) if e.startswith("folder")):
        with contextlib.suppress(OSError), open(os.path.join(tmp, entry, "config.pbtxt"), errors="replace") as fh:
            if f"dsm-serve-{pid}-" in fh.read():
                found.append(os.path.join(tmp, entry))
    return found


@pytest.mark.parametrize("moment", SIGTERM_MOMENTS, ids=lambda m: f"{m}s" if isinstance(m, int) else m)
def test_sigterm_at_any_moment_stops_within_10_s(dsm_onnx, tmp_path, moment):
    """SIGTERM at any moment of the start or the run: exit within 10 s with 0 (or death by the
    signal, before the CLI's handlers are installed: nothing was started), no stack dump, no
    process of its own left (Triton and its stubs included), no workspace or leftovers."""
    before = workspaces()
    http, grpc, metrics = free_ports(3)
    args = [sys.executable, "-m", "dsm_export", "serve", dsm_onnx, "--name", "dsm", "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"]
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
    tree = _Tree(proc.pid)
    try:
        if isinstance(moment, int):
            time.sleep(moment)
        else:
            tree.wait_for(moment)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        tree.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "err.log").read_text(errors="replace")
    log = (tmp_path / "out.log").read_text(errors="replace") + stderr
    assert elapsed < STOP_LIMIT_S, (f"took {elapsed:.1f} s", log[-3000:])
    assert code in (0, 143, -signal.SIGTERM), (code, log[-3000:])  # -15 from Popen, 143 through a shell
    assert not re.search(r"Traceback|Thread 0x|Current thread|did not finish", stderr), stderr[-3000:]
    assert not OWN_TRACEBACK.search(log), log[-3000:]
    assert not tree.running(), f"child processes left running (seen: {sorted(tree.names)})"
    assert not own_workspaces(proc.pid, before), "PyTriton workspace left behind"
    assert not _left_behind(proc.pid)
    print(f"SIGTERM at {moment}: exit {code} in {elapsed:.1f} s; seen {sorted(tree.names)}")


def test_sigint_while_models_load(dsm_onnx, tmp_path):
    before = workspaces()
    srv = Server([dsm_onnx], ["dsm"], str(tmp_path / "serve.log"), ["--threads", "1"])
    try:
        srv.wait_log("loading: dsm:1")  # Triton runs and loads the models
        _stop_and_check(srv, signal.SIGINT, before)
        assert "stopped" in srv.log() and "ready" not in srv.log()
    finally:
        srv.close()


# ------------------------------------------------------------------ a live server under bad requests
@pytest.fixture(scope="module")
def emb_onnx(dsm_onnx, tmp_path_factory):
    """The DSM export with its output renamed ``embeddings`` (what an embedding export writes)."""
    model = onnx.load(dsm_onnx)
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["embeddings" if o == old else o for o in node.output]
    model.graph.output[0].name = "embeddings"
    path = str(tmp_path_factory.mktemp("emb") / "emb.onnx")
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def live(dsm_onnx, emb_onnx, tmp_path_factory):
    before = workspaces()
    srv = start_ready([dsm_onnx, emb_onnx], ["dsm", "emb"], str(tmp_path_factory.mktemp("log") / "serve.log"),
                      ["--threads", "1", "--max-batch", "4", "--image-instances", "2"])
    try:
        srv.workspaces_before = before
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def photos(images_dir):
    """4 photos: encoded bytes and preprocessed pixels ``[4, 3, 224, 224]``."""
    import timm

    from dsm_export.data import eval_transform, list_images, load_batch

    images = list_images(images_dir, limit=4)
    pixels = load_batch(images, range(4), eval_transform(timm.create_model(DEIT))).numpy()
    encoded = []
    for i in range(4):
        with open(images.path(i), "rb") as fh:
            encoded.append(fh.read())
    return encoded, pixels


def _image_input(httpclient, data):
    inp = httpclient.InferInput("image", [len(data)], "BYTES")
    inp.set_data_from_numpy(np.array(data, dtype=object))
    return inp


def _pixel_input(httpclient, x, name="pixel_values", dtype="FP32"):
    inp = httpclient.InferInput(name, list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return inp


def _post(url, path, body, headers=None):
    req = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def bad_requests(url, photos):
    """Named malformed or oversized requests; each returns True when the server answered with an error."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    data, x = photos

    def raises(model, inputs):
        client = httpclient.InferenceServerClient(url, network_timeout=60)
        try:
            client.infer(model, inputs)
            return False
        except InferenceServerException:
            return True
        finally:
            client.close()

    zeros = np.zeros((1, 3, 224, 224), np.float32)
    return {
        "wrong shape": lambda: raises("dsm", [_pixel_input(httpclient, np.zeros((1, 3, 200, 224), np.float32))]),
        "wrong dtype": lambda: raises("dsm", [_pixel_input(httpclient, zeros.astype(np.float64), dtype="FP64")]),
        "batch over max": lambda: raises("dsm", [_pixel_input(httpclient, np.repeat(zeros, 5, axis=0))]),
        "unknown input": lambda: raises("dsm", [_pixel_input(httpclient, zeros, name="pixels")]),
        "unknown model": lambda: raises("nope", [_pixel_input(httpclient, zeros)]),
        "bytes no image": lambda: raises("dsm_image", [_image_input(httpclient, [b"these bytes are no image"])]),
        "empty image": lambda: raises("dsm_image", [_image_input(httpclient, [b""])]),
        "two images": lambda: raises("dsm_image", [_image_input(httpclient, [data[0], data[1]])]),
        "truncated image": lambda: raises("emb_image", [_image_input(httpclient, [data[0][:2000]])]),
        "malformed JSON": lambda: _post(url, "/v2/models/dsm/infer", b"{not json") >= 400,
        "data shorter than shape": lambda: _post(url, "/v2/models/dsm/infer", json.dumps({"inputs": [{
            "name": "pixel_values", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0.0] * 10}]}).encode(),
            {"Content-Type": "application/json"}) >= 400,
    }


def test_bad_requests_during_good_load(live, photos, dsm_onnx):
    """Concurrent good requests all succeed and are right; every bad one gets an error; the server stays up."""
    import tritonclient.http as httpclient

    from dsm_export.check.validate import onnx_runner

    data, x = photos
    local = onnx_runner(dsm_onnx)(x)
    expected_top1 = local.argmax(-1)
    good = {"ok": 0, "failed": []}
    bad = {"answered": 0, "accepted": []}
    lock = threading.Lock()
    deadline = time.monotonic() + 12

    def good_client(k):
        client = httpclient.InferenceServerClient(live.url, network_timeout=60)
        i = k
        try:
            while time.monotonic() < deadline:
                j = i % 4
                try:
                    if i % 2:
                        out = client.infer("dsm", [_pixel_input(httpclient, x[j:j + 1])]).as_numpy("logits")
                        ok = np.abs(out[0] - local[j]).max() <= 1e-4
                    else:
                        res = client.infer("dsm_image", [_image_input(httpclient, [data[j]])])
                        ok = int(res.as_numpy("top_k_indices")[0]) == expected_top1[j]
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    ok = False
                    with lock:
                        good["failed"].append(repr(exc)[:200])
                with lock:
                    good["ok"] += bool(ok)
                    if not ok and len(good["failed"]) < 5:
                        good["failed"].append(f"wrong answer for photo {j}")
                i += 3
        finally:
            client.close()

    def bad_client():
        cases = bad_requests(live.url, photos)
        while time.monotonic() < deadline:
            for name, send in cases.items():
                answered = send()
                with lock:
                    if answered:
                        bad["answered"] += 1
                    else:
                        bad["accepted"].append(name)

    threads = [threading.Thread(target=good_client, args=(k,)) for k in range(3)] + [threading.Thread(target=bad_client)]
    for t in threads:
        t.start()
    # One oversized image (over the 32 MiB limit) in the middle of the load.
    import tritonclient.http as hc
    from tritonclient.utils import InferenceServerException

    client = hc.InferenceServerClient(live.url, network_timeout=120)
    with pytest.raises(InferenceServerException, match="over the .* limit"):
        client.infer("dsm_image", [_image_input(hc, [data[0] + b"\0" * (33 << 20)])])
    for t in threads:
        t.join()
    assert not good["failed"] and good["ok"] > 10, good
    assert not bad["accepted"] and bad["answered"] >= 11, bad
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("dsm_image")
    client.close()


def test_embedding_output_is_passed_through(live, photos, emb_onnx):
    import tritonclient.http as httpclient

    from dsm_export.check.validate import onnx_runner

    data, x = photos
    local = onnx_runner(emb_onnx)(x)
    client = httpclient.InferenceServerClient(live.url)
    try:
        config = client.get_model_config("emb_image")
        assert [o["name"] for o in config["output"]] == ["embeddings"]
        raw = client.infer("emb", [_pixel_input(httpclient, x[:2])]).as_numpy("embeddings")
        np.testing.assert_allclose(raw, local[:2], rtol=0, atol=1e-4)
        emb = client.infer("emb_image", [_image_input(httpclient, [data[1]])]).as_numpy("embeddings")
        assert emb.shape == (local.shape[1],)
        np.testing.assert_allclose(emb, local[1], rtol=0, atol=1e-4)
    finally:
        client.close()


def test_config_names_the_served_file(live, dsm_onnx):
    import tritonclient.http as httpclient

    from dsm_export.core.models import sha256_file as sha256_of

    client = httpclient.InferenceServerClient(live.url)
    try:
        for name in ("dsm", "dsm_image"):
            params = {k: v["string_value"] for k, v in client.get_model_config(name)["parameters"].items()}
            assert params["dsm.file"] == os.path.abspath(dsm_onnx)
            assert params["dsm.sha256"] == sha256_of(dsm_onnx)
            assert params["dsm.model"] == DEIT and params["dsm.schedule"].startswith("r=34,r_end=0,delay=3,local=1")
    finally:
        client.close()


def test_load_test_script_reports_bad_requests_apart(live, images_dir):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "load_test.py"), "--url", live.url, "--models", "dsm",
         "--clients", "2", "--seconds", "4", "--bad-every", "3", "--images", images_dir],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| dsm")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0][1:-1]]
    good, good_errors, bad, bad_answered, bad_accepted = (int(c) for c in cells[1:6])
    assert good > 0 and good_errors == 0 and bad > 0 and bad_answered == bad and bad_accepted == 0, proc.stdout
    assert "server alive after the load: yes" in proc.stdout


def test_sigterm_mid_request_then_everything_is_gone(live, photos):
    """Last on the module's server: SIGTERM while requests are in flight."""
    import tritonclient.http as httpclient

    data, x = photos
    stop = threading.Event()

    def client_loop():
        client = httpclient.InferenceServerClient(live.url, network_timeout=30)
        try:
            while not stop.is_set():
                try:
                    client.infer("dsm", [_pixel_input(httpclient, x)])
                except Exception:  # noqa: BLE001 - the server goes away under it
                    time.sleep(0.1)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    try:
        elapsed = _stop_and_check(live, signal.SIGTERM, live.workspaces_before)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert elapsed < STOP_LIMIT_S and "stopped" in live.log()


def test_micro_batcher_batches_concurrent_callers():
    """The ``_image`` models' in-process batching: concurrent rows run together, each caller gets
    its own row back, and a failing run fails only the callers of that run."""
    from concurrent.futures import ThreadPoolExecutor

    from dsm_export.serving.batcher import MicroBatcher

    sizes = []

    def run(x):
        sizes.append(len(x))
        if (x < 0).any():
            raise ValueError("negative")
        return x * 2

    batcher = MicroBatcher(run, max_batch=8, max_delay_s=0.05)
    try:
        with ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(lambda v: batcher(np.full((1, 3), v, np.float32)), range(16)))
        assert [float(r[0, 0]) for r in rows] == [2.0 * v for v in range(16)]
        assert max(sizes) > 1 and max(sizes) <= 8 and batcher.items == 16
        with pytest.raises(ValueError, match="negative"):
            batcher(np.full((1, 3), -1, np.float32))
        assert float(batcher(np.ones((1, 3), np.float32))[0, 0]) == 2.0  # still serving
    finally:
        batcher.close()


_STUCK = r"""
import subprocess, sys, threading, time
from dsm_export.serving.serve import ShutdownGuard

def never_ends():  # a non-daemon thread that never joins, as a stuck PyTriton handler would be
    threading.Event().wait()

threading.Thread(target=never_ends, name="stuck-handler").start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
ShutdownGuard(30.0, 3, what="nothing").cancel()  # cancelled in time: does nothing
ShutdownGuard(1.5, 7, what="exiting after a test")
"""


def test_shutdown_guard_ends_a_process_whose_exit_hangs():
    """A thread that never joins would hold the interpreter's exit for ever; the guard bounds it:
    stacks on stderr (naming the stuck function), child processes ended, the status it was given."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "exiting after a test did not finish in 2 s" in proc.stderr
    assert "never_ends" in proc.stderr and "stopped (forced)" in proc.stdout
    assert "nothing did not finish" not in proc.stderr
    child = int(re.search(r"child (\d+)", proc.stdout).group(1))
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)
    assert elapsed < 30
