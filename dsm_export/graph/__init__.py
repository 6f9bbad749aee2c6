"""The ONNX graph: the static-shape export and its metadata (:mod:`.export`), graph rewrites and
checks (:mod:`.onnx_graph`), and the facts about a graph that every engine reads (:mod:`.facts`:
precision, quantization record). Imports only :mod:`dsm_export.core` and the leaf modules."""
