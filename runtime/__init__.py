"""nectar_runtime: the thin, torch-free runtime that answers questions from a bundle.

    bundle.py      load and validate a bundle directory (bundle.json, ONNX graph, tokenizer, context KV)
    backends/      ort-cpu (host arrays), ort-cuda (IOBinding, KV on the GPU), tensorrt (engine, unverified)
    sampling.py    greedy / temperature / top-k / top-p with a seed
    generator.py   Generator: template, prefill, one-token steps, stop tokens, streaming text, timings
    errors.py      BundleError, BackendError, GenerationError: what a user can cause, one line each

Edge install: runtime/requirements.txt; entry point `python -m nectar_runtime BUNDLE --prompt TEXT`.
"""
