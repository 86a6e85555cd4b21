"""Backends that run a bundle's step graph: ONNX Runtime (CPU, CUDA EP) and TensorRT."""
