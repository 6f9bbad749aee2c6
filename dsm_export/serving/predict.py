"""Batch inference over a data set (``dsm-export predict``): an engine of any backend run over an image
folder or a Parquet list of images, its outputs written to a Parquet data set as it goes.

Output: ``OUT.parquet`` is a folder of Parquet files (``part-NNNNN.parquet``), the layout Spark, Ray
Data and pyarrow write and read (``pyarrow.parquet.read_table(OUT)``, ``pandas.read_parquet(OUT)``,
``ray.data.read_parquet(OUT)``). One row per readable image:

* ``path``: the image's path relative to the folder (or as the Parquet list gives it);
* a classifier: ``top_k_classes`` ``int32[k]`` and ``top_k_probs`` ``float32[k]`` (softmax, best
  first), and with ``logits=True`` the whole ``logits`` ``float32[classes]``;
* an embedding model: ``embedding`` ``float32[dim]``.

Each part is written to a temporary file and renamed, so a part is either whole or absent. Beside the
parts (files starting with ``_``, which Parquet readers skip): ``_predict.json`` (the engine's
sha256 and the output's settings, written first; a run into an existing folder must match it), ``_unreadable.tsv``
(path and reason of every image that could not be decoded, appended as found) and
``_SUCCESS.json`` (the summary, written when every image is done).

Resuming: a run into an existing output skips every image already in a part or in
``_unreadable.tsv``, so an interrupted run started again writes each image once. SIGTERM or Ctrl-C
writes the rows already computed as a last part before the process exits.

Memory: images are read a batch at a time and rows leave memory each ``rows_per_file`` rows, so what
the run holds does not grow with the data set beyond its list of paths.

``ray=RayOptions(...)`` runs the same as a Ray Data pipeline (:func:`_predict_ray`): the paths as a
data set, ``map_batches`` on an actor pool whose actors each load the engine once and decode,
preprocess and run their batches, and the rows streamed back to this process's Parquet writer (one
writer keeps resuming and the single-row guarantee the same as the local run).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from ..core.models import sha256_file, transform_for
from ..data import IMAGE_EXTENSIONS, load_image
from ..engines.cluster import (
    Cluster, RayOptions, block_count, pool_arguments, ray_session, require_ray, runner_on_gpu)
from ..engines.registry import EngineFile, Runner, RunnerOptions, import_optional, open_runner
from ..errors import DSMError
from ..fileio import atomic_path, write_json

SETTINGS_FILE = "_predict.json"
UNREADABLE_FILE = "_unreadable.tsv"
SUCCESS_FILE = "_SUCCESS.json"
PART_PREFIX = "part-"


@dataclass(frozen=True)
class PredictOptions:
    """What ``predict`` writes and how it runs.

    Attributes:
        top_k: classes per image (classifiers).
        logits: also write every logit (classifiers).
        batch_size: images per engine call.
        rows_per_file: rows per Parquet part.
        limit: only the first ``limit`` images of the listing.
        progress: show a progress bar (images/s).
    """

    top_k: int = 5
    logits: bool = False
    batch_size: int = 32
    rows_per_file: int = 1024
    limit: int | None = None
    progress: bool = True

    def check(self) -> None:
        """Raises DSMError on a top-k, batch size, part size or limit below 1."""
        for name in ("top_k", "batch_size", "rows_per_file", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DSMError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass
class PredictSummary:
    """What a ``predict`` run did.

    Attributes:
        output: the Parquet folder.
        images: images in the listing (after ``limit``).
        already_done: images found written (or listed unreadable) by an earlier run, skipped.
        written: rows this run wrote.
        unreadable: images this run could not decode (listed in ``_unreadable.tsv``).
        seconds: wall time from loading the engine (on Ray: from starting the session) to the last row.
        images_per_s: images done this run per second of that time.
        runner: the engine's runtime label; ``ray``: the cluster, or None for a local run.
        startup_s: seconds from the start of the loop to the first rows (the engine loaded, and on Ray
            the session and the actors started); None when no row was written.
    """

    output: str
    images: int
    already_done: int
    written: int
    unreadable: int
    seconds: float
    images_per_s: float
    runner: str
    ray: str | None = None
    startup_s: float | None = None


@dataclass(frozen=True)
class ImageList:
    """The images of a run: ``keys`` (the ``path`` column) and ``files`` (where each is read)."""

    keys: tuple[str, ...]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


def list_inputs(source: str, limit: int | None = None) -> ImageList:
    """The images ``source`` names: a folder (searched recursively, sorted, keys relative to it) or a
    Parquet file with a ``path`` column (relative paths taken from the Parquet file's folder).

    Raises:
        DSMError: a missing source, a Parquet file without a ``path`` column, or no image.
    """
    if os.path.isdir(source):
        keys = sorted(os.path.relpath(os.path.join(folder, f), source)
                      for folder, _, files in os.walk(source, followlinks=True)
                      for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        root = source
    elif os.path.isfile(source) and source.lower().endswith(".parquet"):
        pq = import_optional("pyarrow.parquet", "predict", "pyarrow")
        try:
            table = pq.read_table(source, columns=["path"])
        except (KeyError, ValueError, OSError) as exc:
            raise DSMError(f"{source}: needs a 'path' column of image paths ({str(exc).splitlines()[0]})") from None
        keys = [str(p) for p in table.column("path").to_pylist() if p]
        root = os.path.dirname(os.path.abspath(source))
    else:
        raise DSMError(f"--images {source!r}: give an image folder or a .parquet file with a 'path' column")
    keys = keys[:limit] if limit else keys
    if not keys:
        raise DSMError(f"{source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(tuple(keys), tuple(os.path.abspath(os.path.join(root, k)) for k in keys))


def model_transform(info):
    """The model's eval transform (PIL image -> ``[3, H, W]`` float32), from its name in the engine's
    metadata: timm's (no weights are loaded), or a Hugging Face model's own image processor."""
    return transform_for(info.model, info.num_classes)


def decode(files, transform) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """Decode and preprocess ``files``.

    Returns:
        ``(pixels [n_ok, 3, H, W] or None, indices of the readable files, [(index, reason)] of the others)``.
    """
    pixels, ok, bad = [], [], []
    for i, path in enumerate(files):
        try:
            pixels.append(transform(load_image(path)))
            ok.append(i)
        except DSMError as exc:
            bad.append((i, str(exc).split(": ", 1)[-1]))
    return (torch.stack(pixels) if pixels else None), ok, bad


def output_columns(outputs: np.ndarray, embeddings: bool, top_k: int, logits: bool) -> dict[str, np.ndarray]:
    """The output columns of ``[n, D]`` engine outputs (see the module docstring), as numpy arrays."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if embeddings:
        return {"embedding": outputs}
    k = min(top_k, outputs.shape[1])
    shifted = outputs - outputs.max(1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-outputs, axis=1, kind="stable")[:, :k]
    columns = {"top_k_classes": top.astype(np.int32), "top_k_probs": np.take_along_axis(probs, top, 1)}
    if logits:
        columns["logits"] = outputs
    return columns


class PartWriter:
    """The Parquet folder of a run: what earlier runs wrote, and the parts and unreadable list this one
    adds (see the module docstring).

    Raises (constructor):
        DSMError: ``output`` is a file, a folder that is not a ``predict`` output, or a ``predict``
            output written with other settings (engine, top-k, logits).
    """

    def __init__(self, output: str, settings: dict, rows_per_file: int):
        self.pa = import_optional("pyarrow", "predict", "pyarrow")
        self.pq = import_optional("pyarrow.parquet", "predict", "pyarrow")
        self.output, self.rows_per_file = output, rows_per_file
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = self.written = self.unreadable = 0
        self.first_rows_at: float | None = None  # time.perf_counter() of the first rows added
        self._check_folder(settings)
        self.next_part = 1 + max((int(f[len(PART_PREFIX):-8]) for f in self._parts()), default=-1)

    def _parts(self) -> list[str]:
        return sorted(f for f in os.listdir(self.output) if f.startswith(PART_PREFIX) and f.endswith(".parquet"))

    def _check_folder(self, settings: dict) -> None:
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise DSMError(f"--output {self.output!r} is a file: give a folder name (OUT.parquet)")
        settings_path = os.path.join(self.output, SETTINGS_FILE)
        if os.path.isdir(self.output) and os.listdir(self.output):
            if not os.path.isfile(settings_path):
                raise DSMError(f"--output {self.output!r} is a folder that dsm-export predict did not write")
            with open(settings_path, encoding="utf-8") as fh:
                earlier = json.load(fh)
            if earlier != settings:
                changed = sorted(k for k in settings if earlier.get(k) != settings[k])
                raise DSMError(f"--output {self.output!r} was written with other settings ({', '.join(changed)}); "
                               "give another folder to start afresh")
            return
        parent = os.path.dirname(os.path.abspath(self.output))
        if not os.path.isdir(parent):
            raise DSMError(f"output folder {parent!r} does not exist")
        os.makedirs(self.output, exist_ok=True)
        write_json(settings_path, settings)

    def done(self) -> set[str]:
        """The paths earlier runs wrote or listed as unreadable."""
        keys: set[str] = set()
        for part in self._parts():
            table = self.pq.read_table(os.path.join(self.output, part), columns=["path"])
            keys.update(table.column("path").to_pylist())
        unreadable = os.path.join(self.output, UNREADABLE_FILE)
        if os.path.isfile(unreadable):
            with open(unreadable, encoding="utf-8") as fh:
                keys.update(line.split("\t", 1)[0] for line in fh if line.strip())
        return keys

    def add(self, keys, columns: dict[str, np.ndarray]) -> None:
        """Buffer rows (``keys`` and their output columns); write a part each ``rows_per_file`` rows."""
        if len(keys):
            self.first_rows_at = self.first_rows_at or time.perf_counter()
            self.buffer.append({"path": np.asarray(keys, dtype=object), **columns})
            self.buffered += len(keys)
        if self.buffered >= self.rows_per_file:
            self.flush()

    def add_unreadable(self, pairs) -> None:
        """Append ``(path, reason)`` pairs to ``_unreadable.tsv`` (each line written whole)."""
        if not pairs:
            return
        with open(os.path.join(self.output, UNREADABLE_FILE), "a", encoding="utf-8") as fh:
            for key, why in pairs:
                fh.write(f"{key}\t{' '.join(str(why).split())}\n")
        self.unreadable += len(pairs)

    def flush(self) -> None:
        """Write the buffered rows as the next part (temporary file, then rename)."""
        if not self.buffered:
            return
        merged = {name: np.concatenate([b[name] for b in self.buffer]) for name in self.buffer[0]}
        arrays = {"path": self.pa.array(merged.pop("path").tolist(), type=self.pa.string())}
        for name, values in merged.items():
            flat = self.pa.array(np.ascontiguousarray(values).reshape(-1))
            arrays[name] = self.pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        path = os.path.join(self.output, f"{PART_PREFIX}{self.next_part:05d}.parquet")
        with atomic_path(path) as tmp:
            self.pq.write_table(self.pa.table(arrays), tmp)
        self.next_part += 1
        self.written += self.buffered
        self.buffer, self.buffered = [], 0


def _settings(runner: Runner, options: PredictOptions) -> dict:
    """What makes rows of two runs the same kind: the engine's bytes and the output's settings."""
    info = runner.engine_file.info
    return {"engine_sha256": sha256_file(runner.engine_file.path), "model": info.model,
            "schedule": info.schedule.spec(), "output": info.output,
            "top_k": None if info.embeddings else options.top_k,
            "logits": bool(options.logits and not info.embeddings)}


def predict(engine: str, images: str, output: str, runner_options: RunnerOptions | None = None,
            options: PredictOptions | None = None, ray: RayOptions | None = None) -> PredictSummary:
    """Run ``engine`` over every image of ``images`` and write one Parquet row per image to ``output``
    (see the module docstring), resuming where an earlier run into ``output`` stopped.

    Args:
        engine: an engine file of any backend (ONNX, OpenVINO IR, TensorRT plan, ExecuTorch program).
        images: an image folder (recursive) or a Parquet file with a ``path`` column.
        output: the Parquet folder (created; an existing one is resumed).
        runner_options: threads and provider of a local run (a Ray actor runs ``cpus_per_actor`` threads).
        options: :class:`PredictOptions`.
        ray: run as a Ray Data pipeline on this cluster; None: in this process.

    Returns:
        :class:`PredictSummary`; ``_SUCCESS.json`` in ``output`` holds the same.

    Raises:
        DSMError: a bad engine, source, output or option (before any image is read); Ray or pyarrow
            not installed.
    """
    options = options or PredictOptions()
    options.check()
    runner_options = runner_options or RunnerOptions()
    inputs = list_inputs(images, options.limit)
    start = time.perf_counter()
    runner = open_runner(engine, runner_options)  # the runtime and the file, before any image is read
    if len(runner.engine_file.output_dims) != 1:
        runner.close()
        raise DSMError(f"{engine!r} outputs {runner.engine_file.output_name} {list(runner.engine_file.output_dims)} "
                       "per image: predict writes one vector per image (export the pooled output)")
    try:
        writer = PartWriter(output, _settings(runner, options), options.rows_per_file)
        with contextlib.suppress(FileNotFoundError):  # an earlier run's summary: this run is not done yet
            os.remove(os.path.join(output, SUCCESS_FILE))
        done = writer.done()
        todo = [i for i, key in enumerate(inputs.keys) if key not in done]
        try:
            if ray is None:
                _predict_local(runner, inputs, todo, writer, options)
            else:
                runner.close()
                cluster = _predict_ray(runner.engine_file, runner_options, inputs, todo, writer, options, ray)
        finally:
            writer.flush()
    finally:
        runner.close()
    seconds = time.perf_counter() - start
    summary = PredictSummary(output, len(inputs), len(inputs) - len(todo), writer.written, writer.unreadable,
                             seconds, len(todo) / seconds if seconds > 0 else 0.0, runner.label,
                             None if ray is None else cluster.describe(),
                             None if writer.first_rows_at is None else writer.first_rows_at - start)
    write_json(os.path.join(output, SUCCESS_FILE), asdict(summary))
    return summary


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="predict", unit="img", disable=not enabled, smoothing=0.1)


def _predict_local(runner: Runner, inputs: ImageList, todo: list[int], writer: PartWriter,
                   options: PredictOptions) -> None:
    """The plain loop: the next batch is decoded in a thread while the engine runs this one."""
    info = runner.engine_file.info
    transform = model_transform(info)
    batches = [todo[s:s + options.batch_size] for s in range(0, len(todo), options.batch_size)]
    with _progress(len(todo), options.progress) as bar, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, [inputs.files[i] for i in batches[0]], transform) if batches else None
        for n, batch in enumerate(batches):
            pixels, ok, bad = pending.result()
            if n + 1 < len(batches):
                pending = pool.submit(decode, [inputs.files[i] for i in batches[n + 1]], transform)
            writer.add_unreadable([(inputs.keys[batch[i]], why) for i, why in bad])
            if pixels is not None:
                columns = output_columns(runner(pixels.numpy()), info.embeddings, options.top_k, options.logits)
                writer.add([inputs.keys[batch[i]] for i in ok], columns)
            bar.update(len(batch))


class _PredictActor:
    """A Ray actor: loads the engine once, then decodes, preprocesses and runs batches of paths."""

    def __init__(self, engine: str, runner_options: RunnerOptions, options: PredictOptions):
        self.runner = open_runner(engine, runner_options)
        self.info = self.runner.engine_file.info
        self.transform = model_transform(self.info)
        self.options = options
        torch.set_num_threads(runner_options.threads or 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, ok, bad = decode(list(batch["file"]), self.transform)
        n = len(batch["file"])
        errors = np.full(n, "", dtype=object)
        for i, why in bad:
            errors[i] = why or "unreadable"
        dims = self.runner.engine_file.output_dims
        outputs = np.zeros((n, *dims), np.float32)
        if pixels is not None:
            outputs[ok] = self.runner(pixels.numpy())
        columns = output_columns(outputs, self.info.embeddings, self.options.top_k, self.options.logits)
        return {"key": batch["key"], "error": errors, **columns}


def _predict_ray(engine: EngineFile, runner_options: RunnerOptions, inputs: ImageList, todo: list[int],
                 writer: PartWriter, options: PredictOptions, ray_options: RayOptions) -> Cluster:
    """The Ray Data pipeline: paths -> ``map_batches`` on engine actors -> rows back to ``writer``."""
    with ray_session(ray_options) as cluster:
        pool = pool_arguments(cluster, ray_options, runner_on_gpu(engine, runner_options))
        actor_options = replace(runner_options, threads=ray_options.cpus_per_actor)
        items = [{"key": inputs.keys[i], "file": inputs.files[i]} for i in todo]
        if not items:
            return cluster
        blocks = block_count(len(items), options.batch_size, pool)
        ds = require_ray().data.from_items(items, override_num_blocks=blocks).map_batches(
            _PredictActor, fn_constructor_args=(engine.path, actor_options, options), batch_size=options.batch_size,
            batch_format="numpy", **pool)
        with _progress(len(items), options.progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors, keys = batch.pop("error"), batch.pop("key")
                failed = errors != ""
                writer.add_unreadable(list(zip(keys[failed], errors[failed])))
                writer.add(list(keys[~failed]), {name: values[~failed] for name, values in batch.items()})
                bar.update(len(keys))
    return cluster
