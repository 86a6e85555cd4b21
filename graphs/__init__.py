"""nectar_graphs: the traceable step module, ONNX export and graph passes (export issue; not built yet)."""
