"""nectar_runtime: the thin, torch-free runtime that answers questions from a bundle.

    bundle.py      the bundle folder and BundleManifest, the only reader and writer of bundle.json
    external_data.py  the files an ONNX graph reads as external data, from its protobuf bytes (no onnx package)
    backends/      the Backend base class and the registry: ort-cpu (host arrays), ort-cuda (IOBinding, KV on
                   the GPU), tensorrt (engine, unverified)
    sampling.py    greedy / temperature / top-k / top-p with a seed
    generator.py   Generator: template, prefill, one-token steps, stop tokens, streaming text, timings
    errors.py      NectarError, the root of every user-facing error (BundleError, BackendError, GenerationError),
                   and NectarInternalError for broken invariants
    fields.py      typed reads of manifest JSON with one-line errors

Edge install: runtime/requirements.txt; entry point `python -m nectar_runtime BUNDLE --prompt TEXT`.
"""
