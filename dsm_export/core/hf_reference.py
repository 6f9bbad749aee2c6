"""A merge schedule run through a Hugging Face model's own modules: the reference ``validate`` checks a
Hugging Face export against.

:class:`HFMergedReference` drives the ``transformers`` model layer by layer, as ToMe's patch drives
timm's blocks: the model's embeddings, LayerNorms, q/k/v and output projections, LayerScale and MLP
modules, and its own attention implementation (``config._attn_implementation``: ``eager`` or
``sdpa``, called through ``transformers``' attention interface with ``log(size)`` as the additive
attention mask), with the merge between attention and MLP. Dense layers before the first merge run
the layer's own ``forward``. The merge steps themselves (bipartite matching on the keys averaged over
heads, windows, protect, prune, MLERP, ``mode=tome``) are :class:`~dsm_export.core.patch.MergedViT`'s
reference methods, so both hosts merge by the same rules; the head is the model's own (classifier,
pooler, ``post_layernorm`` and projection, or SigLIP's attention-pooling head with ``log(size)`` as its
attention mask).
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from ..errors import DSMError
from .hf import HIDDEN_STATE, SUPPORTED, layer_modules, parts
from .merge import heads_metric
from .patch import MergedViT, apply
from .schedule import Schedule


def merged_reference(model: nn.Module, schedule: Schedule | str, name: str | None = None) -> nn.Module:
    """The eager PyTorch reference of ``schedule`` on ``model``: :class:`HFMergedReference` for a model
    rebuilt from Hugging Face (it keeps the ``transformers`` model as ``model.hf_model``), else
    :func:`~dsm_export.core.patch.apply` with ``impl="reference"``.

    Raises:
        UnsupportedModelError, ScheduleError: as :class:`~dsm_export.core.patch.MergedViT`.
    """
    if getattr(model, "hf_model", None) is not None:
        return HFMergedReference(model, schedule, name).eval()
    return apply(model, schedule, impl="reference", name=name).eval()


def _attention_function(attn: nn.Module, config):
    """The model's attention implementation: ``transformers``' interface for ``config``'s
    ``_attn_implementation``, with the model module's own ``eager_attention_forward`` as the eager one."""
    functions = importlib.import_module("transformers.modeling_utils").ALL_ATTENTION_FUNCTIONS
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        if eager is None:
            raise DSMError(f"{type(attn).__name__} has no eager_attention_forward")
        return eager
    if impl not in functions:
        raise DSMError(f"attention implementation {impl!r} is not one dsm-export's reference runs (eager, sdpa)")
    return functions[impl]


class HFMergedReference(nn.Module):
    """``schedule`` through the Hugging Face model behind ``model`` (see the module docstring).

    Args:
        model: a model from :func:`dsm_export.core.models.create_hf_model` (``hf_model``, ``hf_spec``).
        schedule: the merge schedule or its text form.
        name: for error messages.

    Input ``[B, 3, H, W]`` float32 pixels; output the Hugging Face output ``model.hf_spec.output`` names
    (``[B, classes]`` or ``[B, dim]``).

    Raises:
        UnsupportedModelError, ScheduleError: as :class:`~dsm_export.core.patch.MergedViT`.
    """

    def __init__(self, model: nn.Module, schedule: Schedule | str, name: str | None = None):
        super().__init__()
        if isinstance(schedule, str):
            schedule = Schedule.parse(schedule)
        self.rules = MergedViT(model, schedule, impl="reference", name=name)  # plan and merge steps
        object.__setattr__(self, "hf", model.hf_model)  # not a submodule: its weights stay the model's own
        self.spec = model.hf_spec
        self.family = SUPPORTED[self.spec.architecture][0]
        self.schedule = schedule
        layers = parts(self.hf, self.family)[2]
        attn = layers[0].attention if hasattr(layers[0], "attention") else layers[0].self_attn
        self.attention_function = _attention_function(attn, self.hf.config)  # looked up once, not per layer

    @property
    def tokens(self):
        return self.rules.tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        base, emb, layers, _, pre_norm = parts(self.hf, self.family)
        x = emb(pixel_values)
        if pre_norm is not None:
            x = pre_norm(x)
        rules, p = self.rules, self.rules.num_prefix
        size, in_windows = None, False
        for layer, t in zip(layers, rules.tokens):
            if size is None and t.removed == 0:
                x = layer(x, None)  # the layer's own forward, its own attention implementation
                continue
            if t.per_window and not in_windows:
                x = torch.cat([x[:, :p], torch.index_select(x[:, p:], 1, rules.window_perm)], dim=1)
                in_windows = True
            x, size = self._layer(layer, x, size, t)
        return self._head(base, x, size)

    def _layer(self, layer, x, size, t):
        """One layer with proportional attention, the merge, then the MLP (on fewer tokens)."""
        rules = self.rules
        n1, q_proj, k_proj, v_proj, o_proj, n2, _, _, ls1, ls2 = layer_modules(layer, self.family)
        attn = layer.attention if hasattr(layer, "attention") else layer.self_attn
        h = n1(x)
        b, n, c = h.shape
        heads = self.hf.config.num_attention_heads
        d = c // heads
        q, k, v = (proj(h).view(b, n, heads, d).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))
        bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N]
        out, _ = self.attention_function(attn, q, k, v, bias, scaling=d ** -0.5, dropout=0.0)
        out = o_proj(out.reshape(b, n, c))
        x = x + (out * ls1 if ls1 is not None else out)
        if t.removed:
            needs_importance = t.plan.mode == "prune" or t.protect > 0
            importance = self._importance(q, k, bias, d) if needs_importance else None
            keys = rules._metric(h, lambda: heads_metric(k), lambda: k.mean(dim=1))
            if size is None:
                size = torch.ones_like(x[..., :1])
            if rules.tome:
                x, size = rules._merge_tome(x, size, keys, t)
            else:
                x, size = rules._merge(x, size, keys, t, importance)
        mlp = layer.mlp(n2(x))
        return x + (mlp * ls2 if ls2 is not None else mlp), size

    def _importance(self, q, k, bias, d):
        """The class token's attention to each token, mean over heads (without a class token: the mean
        attention each token receives), ``[B, N]``."""
        qi = q[:, :, :1] if self.rules.has_class_token else q
        w = (qi * d ** -0.5) @ k.transpose(-2, -1)
        return torch.softmax(w if bias is None else w + bias, dim=-1).mean(dim=2).mean(dim=1)

    def _head(self, base, x, size):
        """The model's own head on the merged tokens."""
        hf, arch, fam = self.hf, self.spec.architecture, self.family
        if self.spec.output == HIDDEN_STATE:  # as the models return it
            return x if fam == "clip" else (base.post_layernorm(x) if fam == "siglip" else base.layernorm(x))
        if fam == "clip":
            pooled = base.post_layernorm(x[:, 0])
            return hf.visual_projection(pooled) if arch == "CLIPVisionModelWithProjection" else pooled
        if fam == "siglip":
            return _siglip_pool(base.head, base.post_layernorm(x), size)
        seq = base.layernorm(x)
        if arch == "DeiTForImageClassificationWithTeacher":
            return (hf.cls_classifier(seq[:, 0]) + hf.distillation_classifier(seq[:, 1])) / 2
        if arch.endswith("ForImageClassification"):
            return hf.classifier(seq[:, 0])
        if arch in ("ViTModel", "DeiTModel"):
            return base.pooler(seq)
        return seq[:, 0]  # DINOv2's pooler_output


def _siglip_pool(head: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead`` with ``log(size)`` as its attention mask."""
    b, n, _ = x.shape
    mask = None
    if size is not None:  # nn.MultiheadAttention takes a float mask [B * heads, queries, N]
        mask = size.log().transpose(1, 2).repeat_interleave(head.attention.num_heads, dim=0)
    probe = head.probe.repeat(b, 1, 1)
    h = head.attention(probe, x, x, attn_mask=mask, need_weights=False)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]
