"""Creating timm models from local weights, with clear errors for user mistakes."""

from __future__ import annotations

import hashlib
import os
import warnings

import torch
from torch import nn

from .errors import DSMError
from .patch import check_supported


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str) -> dict:
    """Load a state dict saved bare or under ``model`` / ``state_dict`` (``torch.load``, weights only).

    Raises:
        DSMError: if the file is missing or is not a PyTorch state dict.
    """
    if not os.path.isfile(path):
        raise DSMError(f"weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file
        raise DSMError(f"weights file {path!r} could not be read: {type(exc).__name__}: {exc}") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DSMError(f"weights file {path!r} holds no state dict of tensors")
    return state


def create_model(name: str, weights: str | None = None, warn_random: bool = True) -> nn.Module:
    """Create a timm model by name, load local weights strictly, and put it in eval mode.

    Nothing is downloaded: without ``weights`` the model is randomly initialised (with a warning).

    Args:
        name: a timm model name, e.g. ``deit_tiny_patch16_224``.
        weights: path to a state dict (bare or under ``model``), or None.
        warn_random: warn when no weights are given.

    Returns:
        The model in eval mode, float32, on the CPU.

    Raises:
        DSMError: unknown model name, missing or unreadable weights, or weights of another model
            (missing/unexpected keys or shape mismatches).
        UnsupportedModelError: if DSM cannot be applied to this architecture.
    """
    import timm

    if not timm.is_model(name):
        raise DSMError(f"unknown timm model {name!r} (see timm.list_models())")
    state = load_state_dict(weights) if weights else None
    model = timm.create_model(name, pretrained=False)
    check_supported(model, name)
    if state is None:
        if warn_random:
            warnings.warn(f"no weights given: {name} is randomly initialised", stacklevel=2)
    else:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            detail = []
            if missing:
                detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if wrong:
                k = wrong[0]
                detail.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} "
                              f"vs {tuple(own[k].shape)})")
            raise DSMError(f"weights {weights!r} do not fit {name}: " + ", ".join(detail))
        model.load_state_dict(state, strict=True)
    return model.float().eval()
