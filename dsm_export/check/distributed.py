"""``validate --ray``: the images of a validation sharded over Ray actors.

Each actor loads the engine and the PyTorch reference (the unmerged model and the schedule's reference
form) once, then decodes, preprocesses and runs batches of images through all three, as the local
:func:`~dsm_export.check.validate.collect_logits` does; the outputs come back with each image's index
and are put in the listing's order, and :func:`~dsm_export.check.validate.logits_report` makes the
same report as a local run from them. The pipeline is Ray Data's ``map_batches`` on an actor pool
(:mod:`dsm_export.engines.cluster` sizes it: one actor per CPU by default).

Figures equal the local run's: counts, top-1 and accuracy exactly; the float figures (max |dlogit|,
KL) to float rounding, since an actor runs the engine and PyTorch on its own threads
(``cpus_per_actor``, 1 by default) and a matrix product's sums may be split differently.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageSet, eval_transform, load_batch
from ..engines.cluster import RayOptions, block_count, pool_arguments, ray_session, require_ray, runner_on_gpu
from ..engines.registry import EngineFile, RunnerOptions, open_runner
from ..graph.export import ExportInfo
from .validate import Logits, ValidateOptions, logits_report, reference_models


class _ValidateActor:
    """A Ray actor: the engine and the PyTorch reference, loaded once; batches of image paths in,
    ``graph``, ``merged`` and ``unmerged`` outputs out."""

    def __init__(self, engine: str, runner_options: RunnerOptions, info: ExportInfo, options: ValidateOptions):
        torch.set_num_threads(runner_options.threads or 1)
        self.runner = open_runner(engine, runner_options)
        self.ref = reference_models(info, options)
        self.transform = eval_transform(self.ref.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = list(batch["file"])
        images = ImageSet("", tuple(files), None)
        pixels = load_batch(images, range(len(files)), self.transform)
        with torch.inference_mode():
            merged = self.ref.merged(pixels).float().numpy()
            unmerged = self.ref.unmerged(pixels).float().numpy()
        graph = np.asarray(self.runner(pixels.numpy()), dtype=np.float32)
        return {"index": batch["index"], "graph": graph, "merged": merged, "unmerged": unmerged}


def collect_logits_ray(engine: str, runner_options: RunnerOptions, info: ExportInfo, images: ImageSet,
                       options: ValidateOptions, pool: dict) -> Logits:
    """Run the engine and the reference over ``images`` on the actor pool ``pool``
    (:func:`~dsm_export.engines.cluster.pool_arguments`), in the listing's order.

    Returns:
        :class:`~dsm_export.check.validate.Logits`, ``[images, D]`` each.
    """
    ray = require_ray()
    items = [{"index": i, "file": images.path(i)} for i in range(len(images))]
    ds = ray.data.from_items(items, override_num_blocks=block_count(len(items), options.batch_size, pool))
    ds = ds.map_batches(_ValidateActor, fn_constructor_args=(engine, runner_options, info, options),
                        batch_size=options.batch_size, batch_format="numpy", **pool)
    parts: dict[str, list[np.ndarray]] = {"index": [], "graph": [], "merged": [], "unmerged": []}
    with tqdm(total=len(items), desc="validate", unit="img", disable=not options.progress, leave=False) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name in parts:
                parts[name].append(batch[name])
            bar.update(len(batch["index"]))
    order = np.argsort(np.concatenate(parts["index"]))
    graph, merged, unmerged = (np.concatenate(parts[name])[order] for name in ("graph", "merged", "unmerged"))
    return Logits(graph, merged, unmerged)


def validate_ray(engine: EngineFile, images: ImageSet, options: ValidateOptions, precision: str,
                 runner_options: RunnerOptions | None = None, ray: RayOptions | None = None) -> dict:
    """:func:`~dsm_export.check.validate.validate_runner`'s report, the images run on Ray actors.

    Args:
        engine: what the engine file says of itself (every node must see the file, and the images and
            weights, at the same path); an engine that runs on a GPU gets one actor per GPU.
        images: the (checked) image set; options: :class:`ValidateOptions`.
        precision: the criterion (the engine's ``judged_as`` unless the user named one).
        runner_options: the engine's options on each actor (``threads`` is set to ``cpus_per_actor``).
        ray: where and how wide (:class:`~dsm_export.engines.cluster.RayOptions`).

    Returns:
        The report of a local validation, plus ``ray`` (the cluster, one line) and ``ray_actors``.

    Raises:
        DSMError: Ray not installed or unreachable, and everything ``validate_runner`` raises.
    """
    ray, runner_options = ray or RayOptions(), runner_options or RunnerOptions()
    options.check()
    ref = reference_models(engine.info, options)  # weights and model checked here before the cluster starts
    with ray_session(ray) as cluster:
        pool = pool_arguments(cluster, ray, runner_on_gpu(engine, runner_options))
        actor_options = replace(runner_options, threads=ray.cpus_per_actor)
        logits = collect_logits_ray(engine.path, actor_options, engine.info, images, options, pool)
    report = logits_report(logits, ref, engine.info, images, options, options.precision or precision)
    report.update(ray=cluster.describe(), ray_actors=pool["compute"].min_size)
    return report
