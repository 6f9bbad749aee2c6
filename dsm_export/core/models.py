"""Creating timm models the timm way: by name (with a pretrained tag or an ``hf-hub:`` id), with
weights from timm's pretrained sources (Hugging Face hub cache, torch hub cache) or from a local file,
through timm's own loading (checkpoint filter functions, position-embedding resampling, classifier
reset for another ``num_classes``), with one-line errors for user mistakes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from ..data import eval_transform
from ..errors import DSMError
from .hf import HIDDEN_STATE, ProcessorTransform, image_processor, is_hf_name, load_hf, processor_size, to_timm
from .patch import check_supported

try:
    from huggingface_hub import errors as hf_errors
except ImportError:  # huggingface_hub before 0.24 has no errors module
    hf_errors = None

HF_SAFE_WEIGHTS = "model.safetensors"
HF_WEIGHTS = "pytorch_model.bin"


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str) -> dict:
    """Load a state dict saved bare or under ``model`` / ``state_dict`` / ``model_ema`` (timm's
    ``load_state_dict``: safetensors or ``torch.load`` with ``weights_only``).

    Raises:
        DSMError: if the file is missing or is not a PyTorch state dict.
    """
    if not os.path.isfile(path):
        raise DSMError(f"weights file {path!r} does not exist")
    try:
        state = timm_load_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise DSMError(f"weights file {path!r} could not be read: {_first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DSMError(f"weights file {path!r} holds no state dict of tensors")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def check_model_name(name: str) -> None:
    """Check that ``name`` is a timm model, optionally with a pretrained tag (``arch.tag``) or an
    ``hf-hub:`` id (``timm.models.parse_model_name`` / ``split_model_name_tag``).

    Raises:
        DSMError: unknown architecture or unknown pretrained tag.
    """
    source, rest = parse_model_name(name)
    if source == "hf-hub":
        if not rest or "/" not in rest:
            raise DSMError(f"{name!r}: expected hf-hub:ORGANISATION/REPOSITORY")
        return
    arch, tag = split_model_name_tag(rest)
    if not timm.is_model(arch):
        raise DSMError(f"unknown timm model {arch!r} (see timm.list_models())")
    if tag:
        try:
            known = get_pretrained_cfg(f"{arch}.{tag}", allow_unregistered=False) is not None
        except RuntimeError:
            known = False
        if not known:
            tags = timm.list_pretrained(f"{arch}.*")
            raise DSMError(f"unknown pretrained tag {tag!r} for {arch} (known: {', '.join(tags) or 'none'})")


@contextlib.contextmanager
def _capture_timm_load_log():
    """Collect timm's 'Missing keys' / 'Unexpected keys' messages of a non-strict load, and keep
    huggingface_hub's per-retry warnings off stderr."""
    logger = logging.getLogger("timm.models._builder")
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith(("Missing keys", "Unexpected keys")):
                records.append(msg)

    handler = _Handler(logging.INFO)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # huggingface_hub logs each retry of an unreachable hub; the failure itself becomes one DSMError.
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        hub_logger.setLevel(hub_level)


def _hub_errors() -> tuple[type, ...]:
    errors: list[type] = [OSError, ConnectionError, TimeoutError]
    if hf_errors is not None:
        errors += [hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled]
    return tuple(errors)


def create_model(name: str, weights: str | None = None, warn_random: bool = True, pretrained: bool = False,
                 num_classes: int | None = None, output: str | None = None) -> nn.Module:
    """Create a timm model by name with timm's own weight loading, and put it in eval mode.

    Weights come from, in this order: ``weights`` (a local file, loaded by timm through
    ``pretrained_cfg_overlay=dict(file=...)``, so original-format checkpoints that timm's checkpoint
    filter converts load too; ``.npz`` files through the model's ``load_pretrained``), timm's
    pretrained source of ``name`` when ``pretrained`` (the Hugging Face hub cache, honouring
    ``HF_HOME`` and ``HF_HUB_OFFLINE``), else random initialisation (with a warning).

    Args:
        name: a timm model name, optionally with a pretrained tag (``deit_tiny_patch16_224.fb_in1k``)
            or an ``hf-hub:`` id.
        weights: path to a checkpoint file, or None.
        warn_random: warn when the model is randomly initialised.
        pretrained: load timm's pretrained weights for ``name``.
        num_classes: timm's ``num_classes``: None keeps the model's, 0 gives pooled features
            (identity head); another value resets the classifier.

    Returns:
        The model in eval mode, float32, on the CPU. ``model.pretrained_cfg`` tells where the
        weights came from.

    Raises:
        DSMError: unknown model name or tag, missing or unreadable weights, weights of another model
            (missing/unexpected keys or shape mismatches), pretrained weights neither cached nor
            reachable, ``num_classes`` below 0.
        UnsupportedModelError: if DSM cannot be applied to this architecture.

    A Hugging Face Transformers name (a ``save_pretrained`` folder or a hub id, see
    :func:`dsm_export.core.hf.is_hf_name`) is loaded by :func:`create_hf_model` instead; ``output``
    (an export's recorded output name) ``last_hidden_state`` asks it for every token.
    """
    if is_hf_name(name):
        hidden = output == HIDDEN_STATE
        return create_hf_model(name, weights, pretrained=pretrained, num_classes=num_classes, warn_random=warn_random,
                               output=HIDDEN_STATE if hidden else None)
    check_model_name(name)
    if num_classes is not None and num_classes < 0:
        raise DSMError(f"num_classes must be 0 (pooled features) or more, got {num_classes}")
    kwargs: dict = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    source = None
    if weights:
        if not os.path.isfile(weights):
            raise DSMError(f"weights file {weights!r} does not exist")
        overlay = dict(file=os.path.abspath(weights))
        if weights.endswith(".npz"):
            overlay["custom_load"] = True  # original JAX checkpoints: the model's own npz loader
        kwargs["pretrained_cfg_overlay"] = overlay
        source = f"weights {weights!r}"
    elif pretrained:
        source = f"the pretrained weights of {name}"
    load = bool(weights or pretrained)
    model, load_log = _timm_create(name, load, kwargs, weights, source)
    check_supported(model, name)
    _check_load_log(model, load_log, name, source)
    if not load and warn_random:
        warnings.warn(f"no weights given: {name} is randomly initialised", stacklevel=2)
    return model.float().eval()


def _timm_create(name: str, load: bool, kwargs: dict, weights: str | None, source: str | None):
    """``(model, load_log)``: ``timm.create_model`` with timm's load messages captured, each failure
    turned into one DSMError line (unreadable file, not in the hub cache, weights of another model)."""
    try:
        with _capture_timm_load_log() as load_log, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=load, **kwargs), load_log
    except DSMError:
        raise
    except _hub_errors() as exc:
        if weights and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise DSMError(f"weights file {weights!r} could not be read: {_first_line(exc)}") from None
        offline = (" (HF_HUB_OFFLINE is set)" if hf_constants.HF_HUB_OFFLINE
                   else " (HF_HUB_OFFLINE=1 skips the download attempts)")
        raise DSMError(
            f"{source or name} not found in the Hugging Face cache {hf_constants.HF_HUB_CACHE} and not "
            f"downloadable{offline}: {type(exc).__name__}") from None
    except RuntimeError as exc:
        text = str(exc)
        if "Error(s) in loading state_dict" in text:
            detail = _first_line(text.split("\n", 1)[1]) if "\n" in text else _first_line(exc)
            raise DSMError(f"{source} do not fit {name}: {detail}") from None
        if source:
            raise DSMError(f"{source} could not be loaded into {name}: {_first_line(exc)}") from None
        raise DSMError(f"{name}: {_first_line(exc)}") from None
    except (KeyError, ValueError, AssertionError, EOFError, TypeError) as exc:
        what = source or repr(name)
        raise DSMError(f"{what} could not be loaded into {name}: {type(exc).__name__}: {_first_line(exc)}") \
            from None


def _check_load_log(model: nn.Module, load_log: list[str], name: str, source: str | None) -> None:
    """A non-strict load (another ``num_classes``) may miss only the classifier: any other missing or
    unexpected key raises DSMError (weights of another model)."""
    if not load_log:
        return
    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for msg in load_log if msg.startswith("Missing")
               for k in msg.split("(", 1)[1].split(")", 1)[0].split(", ")]
    foreign = [k for k in missing if not k.startswith(heads)]
    unexpected = [msg for msg in load_log if msg.startswith("Unexpected")]
    if foreign or unexpected:
        example = foreign[0] if foreign else unexpected[0].split("(", 1)[1].split(",")[0].rstrip(")")
        raise DSMError(f"{source} do not fit {name}: {'missing' if foreign else 'unexpected'} key {example}")


def create_hf_model(name: str, weights: str | None = None, pretrained: bool = False, num_classes: int | None = None,
                    warn_random: bool = True, attn_implementation: str | None = None,
                    output: str | None = None) -> nn.Module:
    """A Hugging Face Transformers vision model (folder or cached hub id) rebuilt as the timm ViT it
    computes (:func:`dsm_export.core.hf.to_timm`), at its image processor's size, with the processor as
    its eval transform (``model.hf_transform``, used by :func:`dsm_export.data.eval_transform`).
    ``output``: ``last_hidden_state`` for every token instead of the class's pooled output
    (:func:`dsm_export.core.hf.load_hf`).

    Raises:
        DSMError: ``weights`` or ``num_classes`` given (a Hugging Face model's class and folder decide
            both), transformers missing, the model neither a folder nor cached, unreadable weights.
        UnsupportedModelError: a class outside :data:`dsm_export.core.hf.SUPPORTED`.
    """
    if weights:
        raise DSMError(f"--weights is for timm models: {name!r} loads its own weights (a save_pretrained folder, "
                       "or the Hugging Face cache with --pretrained)")
    if num_classes is not None:
        raise DSMError(f"--num-classes is for timm models: the class of {name!r} decides its output "
                       "(a ...Model class gives pooled features)")
    with contextlib.nullcontext() if warn_random else warnings.catch_warnings():
        if not warn_random:
            warnings.simplefilter("ignore")
        hf_model, spec = load_hf(name, pretrained, attn_implementation, output)
    processor = image_processor(name)
    model = to_timm(hf_model, spec, processor_size(processor))
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    h, w = (int(v) for v in model.patch_embed.img_size)
    model.pretrained_cfg = dict(input_size=(3, h, w), mean=mean, std=std, crop_pct=1.0, interpolation="bicubic",
                                hf_hub_id=name if not os.path.isdir(name) else None, architecture=spec.architecture)
    model.hf_transform = ProcessorTransform(processor) if processor is not None else None
    model.hf_config = hf_model.config
    object.__setattr__(model, "hf_model", hf_model)  # for the reference (hf_reference); not a submodule
    check_supported(model, name)
    return model.float().eval()


def transform_for(name: str, num_classes: int | None = None):
    """The eval transform of the model called ``name`` without loading timm weights: timm's data
    config, or a Hugging Face model's own image processor.

    Raises:
        DSMError: as :func:`create_model`.
    """
    if is_hf_name(name):  # its image processor alone; the model only where it has none (timm's fallback)
        processor = image_processor(name)
        if processor is not None:
            return ProcessorTransform(processor)
        return eval_transform(create_hf_model(name, warn_random=False, pretrained=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eval_transform(timm.create_model(name, pretrained=False, num_classes=num_classes))


def output_name(model: nn.Module) -> str:
    """The exported output's name: a Hugging Face model's (Optimum's: ``logits``, ``pooler_output``,
    ``image_embeds``), else ``embeddings`` for an identity head (timm ``num_classes=0``), else ``logits``."""
    spec = getattr(model, "hf_spec", None)
    if spec is not None:
        return spec.output
    return "embeddings" if int(getattr(model, "num_classes", 1)) == 0 else "logits"


def pretrained_file(model: nn.Module) -> str | None:
    """The local file timm loaded ``model``'s pretrained weights from, or None if unknown.

    Looks where timm's loader looks (``model.pretrained_cfg``): a ``file`` override, else the
    Hugging Face hub cache (``huggingface_hub.try_to_load_from_cache``: ``model.safetensors`` before
    ``pytorch_model.bin``, or the config's ``hf_hub_filename``), else torch hub's checkpoint folder
    for a ``url``.
    """
    spec = getattr(model, "hf_spec", None)
    if spec is not None:
        return spec.weights_file or None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        names += [HF_SAFE_WEIGHTS, HF_WEIGHTS, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    url = cfg.get("url")
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(path):
            return path
    return None


def pretrained_name(name: str, model: nn.Module) -> str:
    """``name`` with the pretrained tag timm resolved (``deit_tiny_patch16_224`` ->
    ``deit_tiny_patch16_224.fb_in1k``); ``hf-hub:`` names and tagged names unchanged; a Hugging Face
    model's hub id or absolute folder."""
    if getattr(model, "hf_spec", None) is not None:
        return model.hf_spec.name
    source, rest = parse_model_name(name)
    if source == "hf-hub" or split_model_name_tag(rest)[1]:
        return name
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    return f"{rest}.{tag}" if tag else name


def is_embedding_model(model: nn.Module) -> bool:
    """Whether the model outputs features (identity head, timm ``num_classes=0``; a Hugging Face
    model's ``pooler_output`` or ``image_embeds``), not class logits."""
    return output_name(model) != "logits"
