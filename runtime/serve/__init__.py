"""nectar_runtime.serve: bundles and packs behind an OpenAI-compatible HTTP API, torch-free (FastAPI + uvicorn).

    config.py     ServeConfig (frozen) and the command line, shared with `nectar-export serve`
    models.py     model ids: Entry (worker, pack, bundle) and loading them from the config
    workers.py    one thread per backend: the bounded queue, Jobs and their events, cancellation, stop strings
    protocol.py   OpenAI's request checks, its Sampling, response and chunk bodies, the error shape
    metrics.py    counters and histograms in Prometheus' text format
    app.py        the FastAPI app: routes, admission, whole and streamed answers, error handlers
    server.py     uvicorn in this process: bind, load, the ready line, graceful stop
    ray_serve.py  the same app as a Ray Serve deployment of N replicas (--replicas N)

    python -m nectar_runtime.serve --bundle NAME=BUNDLE [...] [--base BASE --pack NAME=PACK ...] [--port 8000]

Importing this package imports no web framework; server.main does, when it runs.
"""

from nectar_runtime.serve.server import main

__all__ = ["main"]
