"""The merge method in PyTorch, independent of ONNX and of any runtime: schedules
(:mod:`.schedule`), the pure merge maths (:mod:`.merge`: bipartite matching on the attention keys,
size-weighted merging, proportional attention), the patched timm ViT (:mod:`.patch`), FLOP counts
(:mod:`.flops`) and timm model creation (:mod:`.models`). Imports nothing above it."""
