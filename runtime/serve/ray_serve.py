"""`--replicas N`: the same FastAPI app as a Ray Serve deployment of N replicas on a local Ray that this command
starts and stops. Each replica is a Ray actor that loads every model id of the config (its own Generators and
workers, its own queues and /metrics) and builds the app after its constructor (`serve.ingress()` late-bound);
Ray's HTTP proxy on --host:--port spreads requests over the replicas.

Ray is imported here only, and a missing `ray[serve]` is one error line. A team that runs its own Ray cluster
can deploy `deployment(serve)` with its own `serve run` config instead of this command.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from nectar_runtime.bundle import load_bundle
from nectar_runtime.errors import NectarError
from nectar_runtime.serve.config import ServeConfig, ServeError
from nectar_runtime.serve.server import bind, ready_line, require_server_stack

APP_NAME = "nectar"


def import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), or ServeError saying what to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ServeError("--replicas needs Ray Serve: pip install 'ray[serve]' -c constraints.txt "
                         "(or nectar-export[serve]); without it, serve in one process (--replicas 0)") from None
    return ray, serve


def replica_config(config: ServeConfig) -> ServeConfig:
    """What each replica serves: the config in one process, its ONNX Runtime threads a share of the cores."""
    threads = config.threads
    if threads is None and config.backend == "ort-cpu":
        threads = max(1, (os.cpu_count() or 1) // config.replicas)
    return dataclasses.replace(config, replicas=0, threads=threads)


def deployment(serve: Any) -> Any:
    """The Ray Serve deployment class: a replica loads the config's model ids, then serves the app over them."""
    from nectar_runtime.serve.app import ServeState, create_app
    from nectar_runtime.serve.metrics import Metrics
    from nectar_runtime.serve.models import load_entries

    @serve.deployment(name="nectar")
    @serve.ingress()
    class NectarReplica:
        """One replica: its own Generators, workers and metrics."""

        def __init__(self, config: ServeConfig):
            metrics = Metrics()
            self.state = ServeState(config, load_entries(config, metrics), metrics)

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.state)

    return NectarReplica


def check_sources(config: ServeConfig) -> None:
    """Refuse a missing or damaged bundle here, in one line, before any replica starts (sha256 is theirs)."""
    for name, path in (*config.bundles, *((("base", config.base),) if config.base else ())):
        try:
            load_bundle(path, check_hashes=False)
        except NectarError as exc:
            raise ServeError(f"cannot load {name} ({path}): {exc}") from None


def run_on_ray(config: ServeConfig) -> int:
    """Start a local Ray and Serve, deploy N replicas, print the URL, serve until SIGINT or SIGTERM, stop both."""
    require_server_stack()
    ray, serve = import_ray()
    if config.port == 0:
        raise ServeError("--replicas needs a fixed --port: Ray's proxy cannot report a port it picked")
    check_sources(config)
    bind(config.host, config.port).close()                # a port in use is one error line, not a Ray log
    per_replica = replica_config(config)
    capacity = (len(config.bundles) + (config.base is not None)) * (config.queue + 1)   # Ray's in-flight cap
    ray.init(num_cpus=config.replicas, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, configure_logging=True)
    stop = _stop_on_signals()                             # after ray.init, which installs its own handlers
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": config.host, "port": config.port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        app = deployment(serve).options(num_replicas=config.replicas, max_ongoing_requests=capacity,
                                        ray_actor_options={"num_cpus": 1}).bind(per_replica)
        _deploy(serve, app)
        print(ready_line(f"http://{config.host}:{config.port}", config) + f", {config.replicas} Ray Serve replicas",
              flush=True)
        stop.wait()
    finally:
        _shutdown(ray, serve)
    print("stopped", flush=True)
    return 0


def _deploy(serve: Any, app: Any) -> None:
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:                           # a replica that failed to start, after Ray's retries
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServeError(f"the Ray Serve replicas did not start: {first[:300]}") from None


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _shutdown(ray: Any, serve: Any) -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
