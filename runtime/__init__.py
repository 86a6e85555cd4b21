"""nectar_runtime: the thin ONNX Runtime / TensorRT generation loop (runtime issue; not built yet)."""
