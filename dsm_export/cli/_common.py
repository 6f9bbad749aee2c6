"""Options shared by several subcommands: where weights come from, and the model's head."""

from __future__ import annotations

from ..core.hf import is_hf_folder
from ..core.models import create_model
from ..engines.cluster import RayOptions, require_ray
from ..errors import DSMError

# engines.tensorrt.flavours.FLAVOURS, written out so that parsing the command line does not import the engines package
TENSORRT_FLAVOURS = ("auto", "enterprise", "rtx")
PRETRAINED_HELP = ("timm's pretrained weights for the model name (a tag such as .fb_in1k or an hf-hub: "
                   "name picks them), from the Hugging Face cache ($HF_HOME; HF_HUB_OFFLINE=1 works)")
WEIGHTS_HELP = ("local checkpoint loaded by timm (state dict bare or under 'model'/'state_dict', "
                "safetensors, original-format files timm converts, .npz)")


def add_weights_args(p, num_classes: bool = True) -> None:
    """``--weights FILE``, ``--pretrained`` and (optionally) ``--num-classes N``."""
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--pretrained", action="store_true", help=PRETRAINED_HELP)
    if num_classes:
        p.add_argument("--num-classes", type=int, default=None,
                       help="timm's num_classes: 0 gives pooled features (output 'embeddings'); "
                            "default: the model's")


def model_from_args(args, name: str, require_weights: bool = False):
    """The timm model for ``name`` with the weights the options name (see
    :func:`dsm_export.core.models.create_model`).

    Raises:
        DSMError: both or (with ``require_weights``) neither of --weights and --pretrained, and
            everything ``create_model`` raises.
    """
    check_weights_args(args, require_weights)
    return create_model(name, args.weights, pretrained=args.pretrained,
                        num_classes=getattr(args, "num_classes", None))


def check_weights_args(args, require_weights: bool = False) -> None:
    """Refuse --weights together with --pretrained, and (``require_weights``) neither."""
    if args.weights and args.pretrained:
        raise DSMError("give either --weights FILE or --pretrained, not both")
    if require_weights and not (args.weights or args.pretrained or is_hf_folder(args.model)):
        raise DSMError("give --weights FILE or --pretrained (the search needs trained weights)")


def add_ray_args(p) -> None:
    """``--ray [ADDRESS]``, ``--ray-actors N`` and ``--ray-cpus-per-actor N``."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (a Ray Data pipeline of engine actors): the cluster at ADDRESS, else RAY_ADDRESS, "
                        "else a local Ray instance on this machine's CPUs (the ray extra); every node must see the "
                        "engine and the images at the same path")
    p.add_argument("--ray-actors", type=int, help="engine actors (default: one per CPU, or per GPU for GPU engines)")
    p.add_argument("--ray-cpus-per-actor", type=int, default=1, help="CPUs (and engine threads) per actor (default 1)")


def ray_options(args) -> RayOptions | None:
    """The :class:`~dsm_export.engines.cluster.RayOptions` of :func:`add_ray_args`' options, or None
    without ``--ray``; Ray must be importable.

    Raises:
        DSMError: Ray is not installed, a count below 1, or --ray-actors without --ray.
    """
    if args.ray is None:
        if args.ray_actors is not None:
            raise DSMError("--ray-actors needs --ray")
        return None
    options = RayOptions(address=args.ray or None, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor)
    options.check()
    require_ray()
    return options
