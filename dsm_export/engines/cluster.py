"""Engines on a Ray cluster: connecting to Ray and sizing the actor pool that runs an engine.

``validate --ray`` and ``predict --ray`` run their engine in a Ray Data pipeline (``map_batches`` on an
actor pool, each actor loading the engine once; the pattern of Ray Data's batch-inference guide). This
module owns what both need: :func:`ray_session` connects to a cluster (``--ray ADDRESS``, else
``RAY_ADDRESS``, else a local instance on this machine's CPUs) and says what it holds
(:class:`Cluster`), and :func:`pool_arguments` turns that into ``map_batches`` arguments: one actor per
GPU where the engine runs on a GPU and the cluster has GPUs, else one actor per ``cpus_per_actor``
CPUs. Ray is imported only here and only when a session starts (:func:`import_optional`): without
the ``ray`` extra, ``--ray`` is one line naming it.

Every node must see the engine file and the images at the same path (a shared file system), as Ray
Data's readers of local paths require; ``docs/scale.md`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from ..errors import DSMError
from .registry import EngineFile, RunnerOptions, import_optional

GPU_PROVIDERS = ("cuda", "tensorrt", "CUDAExecutionProvider", "TensorrtExecutionProvider")
MAX_BLOCKS = 1000  # Ray Data blocks a list of images is cut into (about a batch each, up to this many)
# Ray's own object store, for a local instance: the pipeline holds a few batches of images at a
# time, so a small store is enough and keeps Ray from reserving 30 % of the machine's memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray pipeline runs.

    Attributes:
        address: the cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None: ``RAY_ADDRESS``
            if set, else a new local instance.
        actors: engine actors; None: as many as the cluster's GPUs (GPU engines) or its CPUs divided
            by ``cpus_per_actor``.
        cpus_per_actor: CPUs each actor reserves; its engine and PyTorch run that many threads.
        local_cpus: CPUs of a new local instance; None: this machine's.
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: int = 1
    local_cpus: int | None = None

    def check(self) -> None:
        """Raises DSMError on fewer than one actor or one CPU per actor."""
        if self.actors is not None and self.actors < 1:
            raise DSMError(f"--ray-actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor < 1:
            raise DSMError(f"CPUs per actor must be at least 1, got {self.cpus_per_actor}")


@dataclass(frozen=True)
class Cluster:
    """What the connected Ray cluster holds.

    Attributes:
        address: the address connected to (``local`` for an instance this process started).
        nodes: alive nodes.
        cpus, gpus: the cluster's total resources.
    """

    address: str
    nodes: int
    cpus: int
    gpus: int

    def describe(self) -> str:
        """One line: ``Ray local: 1 node, 2 CPUs, 0 GPUs``."""
        return (f"Ray {self.address}: {self.nodes} node{'s' * (self.nodes != 1)}, {self.cpus} CPUs, "
                f"{self.gpus} GPUs")


def require_ray():
    """Import Ray Data, or raise one line naming the ``ray`` extra.

    Returns:
        The ``ray`` module (with ``ray.data`` imported).

    Raises:
        DSMError: ``Ray Data is not installed: pip install 'dsm-export[ray]'``.
    """
    import_optional("ray.data", "ray", "Ray Data")
    return import_optional("ray", "ray", "Ray")


@contextlib.contextmanager
def ray_session(options: RayOptions):
    """Connect to Ray for the block and yield the :class:`Cluster`; a local instance this call
    started is shut down after it (a session already open in this process is used and left open).

    Ray's progress bars and per-stage log lines are turned off: the command shows its own progress.

    Raises:
        DSMError: Ray not installed, or the cluster cannot be reached.
    """
    options.check()
    ray = require_ray()
    started = not ray.is_initialized()
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                      logging_level=logging.ERROR)
        if address is None:
            kwargs.update(num_cpus=options.local_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DSMError(f"cannot connect to Ray at {address!r}: {str(exc).splitlines()[0]}") from None
    for name in ("ray", "ray.data"):  # Ray Data's per-run INFO and WARNING lines: the command prints its own
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        yield Cluster(address or "local", nodes, int(resources.get("CPU", 0)), int(resources.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()


def pool_arguments(cluster: Cluster, options: RayOptions, on_gpu: bool = False) -> dict:
    """``map_batches`` arguments for the engine actors: ``compute`` (an ``ActorPoolStrategy`` of fixed
    size), ``num_cpus`` and, for a GPU engine on a cluster with GPUs, ``num_gpus=1`` per actor.

    Args:
        cluster: what :func:`ray_session` yielded.
        options: :class:`RayOptions` (``actors`` overrides the count).
        on_gpu: the engine runs on a GPU (TensorRT, or ONNX Runtime's CUDA or TensorRT provider).

    Raises:
        DSMError: a GPU engine on a cluster without GPUs, or fewer CPUs than one actor needs.
    """
    ray = require_ray()
    if on_gpu and not cluster.gpus:
        raise DSMError(f"the engine runs on a GPU but the Ray cluster has none ({cluster.describe()})")
    if on_gpu:
        actors = options.actors or cluster.gpus
        return dict(compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=options.cpus_per_actor, num_gpus=1)
    if cluster.cpus < options.cpus_per_actor:
        raise DSMError(f"an actor needs {options.cpus_per_actor} CPUs but the Ray cluster has {cluster.cpus}")
    actors = options.actors or max(1, cluster.cpus // options.cpus_per_actor)
    return dict(compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=options.cpus_per_actor)


def runner_on_gpu(engine: EngineFile, options: RunnerOptions) -> bool:
    """Whether ``engine`` run with ``options`` needs a GPU (a TensorRT plan, or ONNX Runtime's CUDA or
    TensorRT execution provider): its actors then take a GPU each."""
    return engine.backend == "tensorrt" or (options.provider or "cpu") in GPU_PROVIDERS


def block_count(items: int, batch_size: int, pool: dict) -> int:
    """Ray Data blocks for a list of ``items`` images: about one batch each, at least one per actor of
    ``pool`` (each actor then has work from the start), at most :data:`MAX_BLOCKS` and ``items``."""
    actors = pool["compute"].min_size
    return max(1, min(max(actors, -(-items // batch_size)), items, MAX_BLOCKS))
