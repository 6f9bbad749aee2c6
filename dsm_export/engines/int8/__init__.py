"""INT8 for ONNX Runtime (and TensorRT's QDQ parser): post-training quantization with the
matching path kept in fp32 (:mod:`.quantize`, over ``onnxruntime.quantization``) and SmoothQuant
(:mod:`.smoothing`)."""
