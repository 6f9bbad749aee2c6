"""Small timm ViTs of every supported family, randomly initialised (parity only, not accuracy)."""

import timm
import torch

# name -> (timm name, create kwargs, schedule). Depth is cut to keep the tests quick; each schedule
# has dense, local and global blocks.
FAMILIES = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=4), "r=12,delay=1,local=1"),
    "vit_augreg": ("vit_tiny_patch16_224", dict(depth=4), "r=12,delay=1,local=1"),
    "layerscale": ("deit3_small_patch16_224", dict(depth=4), "r=12,delay=1,local=1"),
    "qk_norm": ("vit_tiny_patch16_224", dict(depth=4, qk_norm=True), "r=12,delay=1,local=1"),
    "registers_cls": ("vit_small_patch14_reg4_dinov2", dict(depth=4, img_size=224), "r=12,delay=1,local=1"),
    "registers_avgpool": ("vit_wee_patch16_reg1_gap_256", dict(depth=4), "r=12,delay=1,local=1"),
}


def build(family: str) -> torch.nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # LayerScale starts at 1e-5/1e-6: blocks would barely change tokens and merging would barely
    # matter. Give the scales trained-like magnitudes so every block path counts.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, timm.layers.LayerScale):
                m.gamma.uniform_(0.2, 1.0)
    return model
