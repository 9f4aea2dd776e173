"""Export: diffusers components (+ LoRA) -> ONNX -> TensorRT, with a manifest and parity report."""
