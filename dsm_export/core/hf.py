"""Hugging Face Transformers vision models as a second host beside timm.

A ``transformers`` ViT-family vision model is rebuilt as the timm ``VisionTransformer`` it is
arithmetically (same weights, copied; the same LayerNorm epsilons, activation and token layout), so
every merge path, export form and engine of dsm-export applies unchanged, and the unmerged rebuild
is checked against the Hugging Face model's own forward (eager and sdpa attention) in the tests.

Covered classes (:data:`SUPPORTED`), and the output each export names as Optimum does:

* ``ViTForImageClassification``, ``DeiTForImageClassification``: ``logits`` (the class token);
  ``DeiTForImageClassificationWithTeacher``: ``logits`` (mean of the class and distillation heads).
* ``ViTModel``, ``DeiTModel`` (with their pooling layer): ``pooler_output`` (tanh(dense(class token))).
* ``Dinov2Model``, ``Dinov2WithRegistersModel``: ``pooler_output`` (the normalised class token); the
  position embeddings are interpolated once, by the model's own ``interpolate_pos_encoding``, to the
  static input size (518 px for the DINOv2 hub configs).
* ``CLIPVisionModel``: ``pooler_output``; ``CLIPVisionModelWithProjection`` (and a ``CLIPModel``
  checkpoint): ``image_embeds``.
* ``SiglipVisionModel`` (and a ``SiglipModel`` checkpoint): ``pooler_output`` from its attention-pooling
  head, timm's ``AttentionPoolLatent``; merged tokens enter it with ``log(size)`` in its logits.

Anything else is refused with one line naming the class. Weights come from a ``save_pretrained``
folder or, for a hub id, from the local Hugging Face cache only (``local_files_only``: never a
download). Preprocessing is the checkpoint's own ``AutoImageProcessor`` (:class:`ProcessorTransform`).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from huggingface_hub import try_to_load_from_cache
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import DSMError, UnsupportedModelError

# HF class name -> (family, output name).
SUPPORTED = {
    "ViTForImageClassification": ("vit", "logits"),
    "ViTModel": ("vit", "pooler_output"),
    "DeiTForImageClassification": ("deit", "logits"),
    "DeiTForImageClassificationWithTeacher": ("deit", "logits"),
    "DeiTModel": ("deit", "pooler_output"),
    "Dinov2Model": ("dinov2", "pooler_output"),
    "Dinov2WithRegistersModel": ("dinov2", "pooler_output"),
    "CLIPVisionModel": ("clip", "pooler_output"),
    "CLIPVisionModelWithProjection": ("clip", "image_embeds"),
    "SiglipVisionModel": ("siglip", "pooler_output"),
}
HIDDEN_STATE = "last_hidden_state"  # every token after the last block: the classes without a classifier
# Checkpoints of two-tower models: their vision tower.
TOWERS = {"CLIPModel": "CLIPVisionModelWithProjection", "SiglipModel": "SiglipVisionModel"}
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")  # the attention implementations the reference runs
INSTALL_HINT = "pip install 'dsm-export[transformers]'"


@dataclass(frozen=True)
class HFSpec:
    """Where a rebuilt Hugging Face model came from (attached to it as ``model.hf_spec``).

    Attributes:
        name: the hub id or the ``save_pretrained`` folder (absolute path) it was loaded from.
        architecture: the ``transformers`` class it was loaded as (``CLIPVisionModelWithProjection``).
        output: the exported output's name, Optimum's (``logits``, ``pooler_output``, ``image_embeds``,
            or ``last_hidden_state``: ``[B, tokens, dim]``, the tokens the last block leaves).
        weights_file: the file the weights were read from, or "" for random initialisation.
    """

    name: str
    architecture: str
    output: str
    weights_file: str

    @property
    def pretrained(self) -> bool:
        return bool(self.weights_file)


def hidden_state_output(model: nn.Module) -> bool:
    """Whether ``model`` (rebuilt by :func:`to_timm`) outputs every token: ``last_hidden_state``."""
    spec = getattr(model, "hf_spec", None)
    return spec is not None and spec.output == HIDDEN_STATE


def is_hf_name(name: str) -> bool:
    """Whether ``name`` names a Hugging Face Transformers model: a folder, or a hub id
    (``ORGANISATION/REPOSITORY``) that is not timm's ``hf-hub:`` form."""
    if not name or name.startswith(("hf-hub:", "hf_hub:")):
        return False
    return os.path.isdir(name) or "/" in name


def is_hf_folder(name: str) -> bool:
    """Whether ``name`` is a Hugging Face ``save_pretrained`` folder (it holds its own weights)."""
    return is_hf_name(name) and os.path.isdir(name)


def _transformers():
    # torchao (which transformers imports where it is installed, e.g. beside executorch) registers Enum
    # pytree constants, and torch logs a deprecation notice for each on every run: not the user's concern.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise DSMError(f"Hugging Face models need transformers: {INSTALL_HINT}") from None


def _config(name: str):
    """The model's config, from the folder or the local Hugging Face cache."""
    tf = _transformers()
    looks_local = name.startswith((".", os.sep, "~")) or os.path.isdir(name)
    if looks_local and not os.path.isdir(name):
        raise DSMError(f"model folder {name!r} does not exist")
    try:
        return tf.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if os.path.isdir(name):
            raise DSMError(f"{name!r} is no Hugging Face model folder (no readable config.json)") from None
        raise DSMError(f"Hugging Face model {name!r} is not in the local cache (HF_HOME); dsm-export never "
                       f"downloads: {type(exc).__name__}") from None


def architecture_of(name: str) -> str:
    """The supported ``transformers`` class that ``name``'s config names (a two-tower checkpoint
    maps to its vision tower).

    Raises:
        DSMError: no config found; UnsupportedModelError: any other class.
    """
    config = _config(name)
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        arch = TOWERS.get(arch, arch)
        if arch in SUPPORTED:
            return arch
    label = archs[0] if archs else f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedModelError(
        f"Hugging Face model {name!r} ({label}) is not supported: dsm-export takes "
        f"{', '.join(sorted(SUPPORTED))}")


def _weights_file(name: str) -> str:
    """The weights file that ``from_pretrained`` reads for ``name`` (folder or cache), or ""."""
    for filename in WEIGHT_FILES:
        if os.path.isdir(name):
            path = os.path.join(name, filename)
        else:
            path = try_to_load_from_cache(name, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return ""


def load_hf(name: str, pretrained: bool = False, attn_implementation: str | None = None,
            output: str | None = None) -> tuple[nn.Module, HFSpec]:
    """Load a ``transformers`` vision model as Hugging Face users do, offline, with
    ``attn_implementation`` (``eager``, ``sdpa``; None: transformers' default, sdpa where available).

    A folder always loads its weights; a hub id loads them from the cache with ``pretrained``, else
    its cached config is randomly initialised (with a warning).

    ``output``: None for the class's pooled output (:data:`SUPPORTED`), or ``last_hidden_state`` (every
    token after the last block) for a class without a classifier.

    Returns:
        ``(hf_model in eval mode, float32; HFSpec)``.

    Raises:
        DSMError: transformers missing, folder or cache entry missing, unreadable weights, an output the
        class does not give; UnsupportedModelError: a class outside :data:`SUPPORTED`.
    """
    tf = _transformers()
    tf.utils.logging.disable_progress_bar()
    arch = architecture_of(name)
    pooled = SUPPORTED[arch][1]
    if output not in (None, pooled) and (output != HIDDEN_STATE or pooled == "logits"):
        choices = pooled if pooled == "logits" else f"{pooled} or {HIDDEN_STATE}"
        raise DSMError(f"{arch} gives {choices}, not {output}")
    cls = getattr(tf, arch)
    folder = os.path.isdir(name)
    label = os.path.abspath(name) if folder else name
    load = folder or pretrained
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            impl = {"attn_implementation": attn_implementation} if attn_implementation else {}
            if load:
                model = cls.from_pretrained(name, local_files_only=True, dtype=torch.float32, **impl)
            else:
                config = cls.config_class.from_pretrained(name, local_files_only=True, **impl)
                model = cls(config)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DSMError(f"Hugging Face model {name!r} could not be loaded as {arch}: {text[:300]}") from None
    if not load:
        warnings.warn(f"no weights loaded: {name} ({arch}) is randomly initialised", stacklevel=2)
    spec = HFSpec(label, arch, output or pooled, _weights_file(name) if load else "")
    return model.float().eval(), spec


def class_names(name: str) -> list[str] | None:
    """The class names a classifier's config gives (``id2label``), in class order; None if it has none."""
    try:
        labels = getattr(_config(name), "id2label", None) or {}
    except DSMError:
        return None
    names = [labels.get(i, labels.get(str(i))) for i in range(len(labels))]
    return names if names and all(isinstance(n, str) for n in names) else None


def image_processor(name: str):
    """The checkpoint's own ``AutoImageProcessor``, or None where the folder or cache has none."""
    tf = _transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.AutoImageProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


class ProcessorTransform:
    """A PIL image -> ``[3, H, W]`` float32 pixels through a Hugging Face image processor, the
    transform each command's data path takes (picklable: Ray actors receive it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0].float()


def processor_size(processor) -> tuple[int, int] | None:
    """The ``(height, width)`` a processor outputs: its crop size, else its fixed resize size."""
    if processor is None:
        return None
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if attr == "crop_size" and not getattr(processor, "do_center_crop", False):
            continue
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if hasattr(size, "height") and getattr(size, "height", None):
            return int(size.height), int(size.width)
    return None


def _norm(eps: float):
    return partial(nn.LayerNorm, eps=eps)


def _square(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def parts(model: nn.Module, family: str):
    """The HF modules behind each part: ``(embeddings, layers, final norm, pre-norm or None)``."""
    if family in ("vit", "deit"):
        base = getattr(model, family, model)
        return base, base.embeddings, base.layers, base.layernorm, None
    if family == "dinov2":
        return model, model.embeddings, model.encoder.layer, model.layernorm, None
    base = getattr(model, "vision_model", model)
    if family == "clip":
        return base, base.embeddings, base.encoder.layers, base.post_layernorm, base.pre_layrnorm
    return base, base.embeddings, base.encoder.layers, base.post_layernorm, None


def layer_modules(layer: nn.Module, family: str):
    """``(norm1, q, k, v, out, norm2, fc1, fc2, ls1, ls2)`` of one HF encoder layer."""
    if family in ("vit", "deit"):
        a = layer.attention
        return (layer.layernorm_before, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.layernorm_after,
                layer.mlp.fc1, layer.mlp.fc2, None, None)
    if family == "dinov2":
        a = layer.attention
        if not hasattr(layer.mlp, "fc1"):
            raise UnsupportedModelError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn) is not supported")
        return (layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.norm2, layer.mlp.fc1, layer.mlp.fc2,
                layer.layer_scale1.lambda1, layer.layer_scale2.lambda1)
    a = layer.self_attn
    return (layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.layer_norm2,
            layer.mlp.fc1, layer.mlp.fc2, None, None)


def _vit_kwargs(config, family: str, arch: str, img: tuple[int, int]) -> dict:
    act = ACTIVATIONS.get(config.hidden_act)
    if act is None:
        raise UnsupportedModelError(f"{arch} with hidden_act={config.hidden_act!r} is not supported")
    kwargs = dict(img_size=img, patch_size=_square(config.patch_size), in_chans=int(config.num_channels),
                  embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                  mlp_ratio=_mlp_ratio(config), qkv_bias=bool(getattr(config, "qkv_bias", True)),
                  norm_layer=_norm(config.layer_norm_eps), act_layer=act, num_classes=0, global_pool="token",
                  weight_init="skip")
    if family == "dinov2":
        kwargs["init_values"] = 1.0
        regs = int(getattr(config, "num_register_tokens", 0) or 0)
        if regs:  # HF adds position embeddings before inserting the registers: timm's no_embed_class
            kwargs.update(reg_tokens=regs, no_embed_class=True)
    elif family == "clip":
        kwargs["pre_norm"] = True
    elif family == "siglip":
        kwargs.update(class_token=False, global_pool="map")
    return kwargs


def _mlp_ratio(config) -> float:
    """MLP width over model width: DINOv2 configs give ``mlp_ratio``, the others ``intermediate_size``."""
    width = getattr(config, "intermediate_size", None)
    return width / config.hidden_size if width else float(config.mlp_ratio)


def _copy_layers(vit: VisionTransformer, layers, family: str) -> None:
    for blk, layer in zip(vit.blocks, layers):
        n1, q, k, v, o, n2, fc1, fc2, ls1, ls2 = layer_modules(layer, family)
        blk.norm1.load_state_dict(n1.state_dict())
        blk.norm2.load_state_dict(n2.state_dict())
        blk.attn.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if blk.attn.qkv.bias is not None:
            blk.attn.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        blk.attn.proj.load_state_dict(o.state_dict())
        blk.mlp.fc1.load_state_dict(fc1.state_dict())
        blk.mlp.fc2.load_state_dict(fc2.state_dict())
        if ls1 is not None:
            blk.ls1.gamma.copy_(ls1)
            blk.ls2.gamma.copy_(ls2)


def _copy_embeddings(vit: VisionTransformer, emb, family: str, img: tuple[int, int]) -> None:
    if family in ("clip", "siglip"):
        vit.patch_embed.proj.weight.copy_(emb.patch_embedding.weight)
        if vit.patch_embed.proj.bias is not None:
            vit.patch_embed.proj.bias.copy_(emb.patch_embedding.bias)
        pos = emb.position_embedding.weight[None]
        if family == "clip":
            vit.cls_token.copy_(emb.class_embedding.reshape(1, 1, -1))
    else:
        vit.patch_embed.proj.load_state_dict(emb.patch_embeddings.projection.state_dict())
        pos = emb.position_embeddings
        if family == "dinov2":  # the model's own interpolation, once, to the static size
            prefix = 1
            dummy = torch.zeros(1, prefix + vit.patch_embed.num_patches, pos.shape[-1])
            pos = emb.interpolate_pos_encoding(dummy, img[0], img[1])
        vit.cls_token.copy_(emb.cls_token)
        if getattr(vit, "reg_token", None) is not None:
            vit.reg_token.copy_(emb.register_tokens)
            vit.cls_token.add_(pos[:, :1])  # timm's no_embed_class: the class position folded in
            pos = pos[:, 1:]
    if tuple(pos.shape) != tuple(vit.pos_embed.shape):
        raise UnsupportedModelError(
            f"position embeddings {tuple(pos.shape)} do not fit the {img[0]}x{img[1]} input "
            f"({tuple(vit.pos_embed.shape)}): export at the checkpoint's own image size")
    vit.pos_embed.copy_(pos)


def _copy_siglip_head(vit: VisionTransformer, head) -> None:
    pool, d = vit.attn_pool, vit.embed_dim
    pool.latent.copy_(head.probe)
    w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
    pool.q.weight.copy_(w[:d])
    pool.q.bias.copy_(b[:d])
    pool.kv.weight.copy_(w[d:])
    pool.kv.bias.copy_(b[d:])
    pool.proj.weight.copy_(head.attention.out_proj.weight)
    pool.proj.bias.copy_(head.attention.out_proj.bias)
    pool.norm.load_state_dict(head.layernorm.state_dict())
    pool.mlp.fc1.load_state_dict(head.mlp.fc1.state_dict())
    pool.mlp.fc2.load_state_dict(head.mlp.fc2.state_dict())


def _head(model: nn.Module, arch: str, d: int) -> nn.Module:
    """The timm head after the pooled token: classifier, projection or pooler (or identity)."""
    if arch == "DeiTForImageClassificationWithTeacher":
        return _DistilledHead(model.cls_classifier, model.distillation_classifier)
    if arch.endswith("ForImageClassification"):
        return model.classifier
    if arch == "CLIPVisionModelWithProjection":
        return model.visual_projection
    if arch in ("ViTModel", "DeiTModel"):
        if model.pooler is None:
            raise UnsupportedModelError(f"{arch} without its pooling layer has no pooled output")
        return nn.Sequential(model.pooler.dense, _activation(model.config.pooler_act))
    return nn.Identity()


def _activation(name: str) -> nn.Module:
    tf_act = importlib.import_module("transformers.activations")
    return tf_act.ACT2FN[name]


class _DistilledHead(nn.Module):
    """DeiT with teacher in eval: the mean of the class head (token 0) and the distillation head
    (token 1), read by :class:`HFViT` from the two prefix tokens."""

    def __init__(self, cls_head: nn.Module, dist_head: nn.Module):
        super().__init__()
        self.cls_head, self.dist_head = cls_head, dist_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.cls_head(tokens[:, 0]) + self.dist_head(tokens[:, 1])) / 2


def to_timm(model: nn.Module, spec: HFSpec, image_size: tuple[int, int] | None = None) -> VisionTransformer:
    """Rebuild a supported HF vision model as the timm ``VisionTransformer`` it computes.

    Args:
        model: the ``transformers`` model (eval mode).
        spec: its :class:`HFSpec`.
        image_size: the static ``(height, width)``; None for the config's ``image_size``.

    Returns:
        A timm ViT whose ``forward`` ``[B, 3, H, W]`` -> ``[B, out]`` equals the HF model's output
        named ``spec.output`` (float rounding apart), with ``hf_spec`` attached.

    Raises:
        UnsupportedModelError: a configuration outside what the rebuild covers.
    """
    family = SUPPORTED[spec.architecture][0]
    config = model.config
    img = image_size or (_square(config.image_size),) * 2
    distilled = family == "deit"
    builder = VisionTransformerDistilled if distilled else VisionTransformer  # HF DeiT: distillation token
    vit = builder(**_vit_kwargs(config, family, spec.architecture, img))
    _, emb, layers, final_norm, pre_norm = parts(model, family)
    with torch.no_grad():
        _copy_embeddings(vit, emb, family, img)
        if distilled:
            vit.dist_token.copy_(emb.distillation_token)
        _copy_layers(vit, layers, family)
        vit.norm.load_state_dict(final_norm.state_dict())
        if pre_norm is not None:
            vit.norm_pre.load_state_dict(pre_norm.state_dict())
        if family == "siglip":
            head = getattr(getattr(model, "vision_model", model), "head", None)
            if head is None:
                raise UnsupportedModelError("SiglipVisionModel without its pooling head (vision_use_head=False)")
            _copy_siglip_head(vit, head)
    head = nn.Identity() if spec.output == HIDDEN_STATE else _head(model, spec.architecture, vit.embed_dim)
    vit = _with_head(vit, head, distilled, spec)
    # HF's last_hidden_state: after the final LayerNorm, except CLIP's (post_layernorm is for the pooled token)
    vit.hidden_state_norm = family != "clip"
    vit.hf_spec = spec
    return vit.eval()


def _with_head(vit: VisionTransformer, head: nn.Module, distilled: bool, spec: HFSpec) -> VisionTransformer:
    """Install ``head``; timm's ``num_classes`` becomes the output width (0: pooled features)."""
    if distilled:
        if isinstance(head, _DistilledHead):
            vit.head, vit.head_dist = head.cls_head, head.dist_head
        else:  # one head on the class token only: the distillation token still attends
            vit.head, vit.head_dist = head, None
            vit.forward_head = partial(_class_token_head, vit)
    else:
        vit.head = head
    out = getattr(head, "out_features", None)
    if isinstance(head, nn.Sequential):
        out = head[0].out_features
    elif isinstance(head, _DistilledHead):
        out = head.cls_head.out_features
    vit.num_classes = int(out or 0)
    return vit


def _class_token_head(vit: VisionTransformer, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    x = x[:, 0]
    return x if pre_logits else vit.head(x)


def save_as_hf_vit(model: VisionTransformer, folder: str, processor=None, eps: float = 1e-12) -> None:
    """Write a plain timm ViT classifier (class token, ``global_pool='token'``, no distillation or
    register tokens) as a ``ViTForImageClassification`` ``save_pretrained`` folder, the layout of
    Hugging Face's DeiT checkpoints (``facebook/deit-tiny-patch16-224``: LayerNorm epsilon 1e-12).

    Args:
        model: the timm model (its weights are copied).
        folder: created if missing; ``config.json``, ``model.safetensors`` and, with ``processor``, its
            ``preprocessor_config.json``.
        processor: a Hugging Face image processor to save beside, or None.
        eps: the config's ``layer_norm_eps``.

    Raises:
        UnsupportedModelError: a model this layout cannot hold.
    """
    tf = _transformers()
    if getattr(model, "dist_token", None) is not None or model.num_reg_tokens or model.global_pool != "token":
        raise UnsupportedModelError("only a plain class-token timm ViT maps onto ViTForImageClassification")
    blk0 = model.blocks[0]
    config = tf.ViTConfig(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk0.attn.num_heads,
        intermediate_size=blk0.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=eps,
        image_size=int(model.patch_embed.img_size[0]), patch_size=int(model.patch_embed.patch_size[0]),
        num_channels=int(model.patch_embed.proj.in_channels), qkv_bias=blk0.attn.qkv.bias is not None,
        num_labels=model.num_classes, architectures=["ViTForImageClassification"])
    hf = tf.ViTForImageClassification(config).eval()
    d = model.embed_dim
    with torch.no_grad():
        emb = hf.vit.embeddings
        emb.cls_token.copy_(model.cls_token)
        emb.position_embeddings.copy_(model.pos_embed)
        emb.patch_embeddings.projection.load_state_dict(model.patch_embed.proj.state_dict())
        for blk, layer in zip(model.blocks, hf.vit.layers):
            a = layer.attention
            for i, proj in enumerate((a.q_proj, a.k_proj, a.v_proj)):
                proj.weight.copy_(blk.attn.qkv.weight[i * d:(i + 1) * d])
                proj.bias.copy_(blk.attn.qkv.bias[i * d:(i + 1) * d])
            a.o_proj.load_state_dict(blk.attn.proj.state_dict())
            layer.layernorm_before.load_state_dict(blk.norm1.state_dict())
            layer.layernorm_after.load_state_dict(blk.norm2.state_dict())
            layer.mlp.fc1.load_state_dict(blk.mlp.fc1.state_dict())
            layer.mlp.fc2.load_state_dict(blk.mlp.fc2.state_dict())
        hf.vit.layernorm.load_state_dict(model.norm.state_dict())
        hf.classifier.load_state_dict(model.head.state_dict())
    os.makedirs(folder, exist_ok=True)
    hf.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
