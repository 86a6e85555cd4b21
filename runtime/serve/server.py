"""Run the app on uvicorn in this process: bind the address first (a port in use is one error line), load every
model id, print one line with the URL once requests are taken, and stop gracefully on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any, Sequence

from nectar_runtime.errors import NectarError
from nectar_runtime.serve.config import ServeConfig, ServeError, config_from_args, parser

STOP_WAIT_S = 10                 # graceful shutdown: how long running requests may go on after a signal
INSTALL = "pip install -r runtime/requirements-serve.txt -c constraints.txt (or nectar-export[serve])"


def require_server_stack() -> None:
    """ServeError naming what to install when fastapi or uvicorn is absent."""
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise ServeError(f"serving needs the {module} package: {INSTALL}") from None


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: a free port); ServeError when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def ready_line(url: str, config: ServeConfig) -> str:
    return (f"serving {url}/v1 models {', '.join(config.model_ids)} ({config.backend}, queue {config.queue}, "
            f"timeout {config.timeout_s:g} s)")


def run_here(config: ServeConfig) -> int:
    """Serve in this process until a signal; the model ids load before the first request is taken."""
    require_server_stack()
    from nectar_runtime.serve.app import ServeState, create_app
    from nectar_runtime.serve.metrics import Metrics
    from nectar_runtime.serve.models import load_entries

    sock = bind(config.host, config.port)
    metrics = Metrics()
    state = ServeState(config, load_entries(config, metrics), metrics)
    server = uvicorn_server(create_app(state), state)
    previous = signal.signal(signal.SIGTERM, _ignore)     # uvicorn re-raises the signal after a graceful stop
    try:
        asyncio.run(_serve(server, sock, ready_line(url_of(sock), config)))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not server.started:
        raise ServeError("the server did not start; see the lines above")
    print("stopped", flush=True)
    return 0


def _ignore(*_: Any) -> None:
    pass


def uvicorn_server(app: Any, state: Any) -> Any:
    """A quiet uvicorn.Server for `app` that also marks `state` stopping when a signal arrives (then 503s)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.phase = "stopping"
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                 timeout_graceful_shutdown=STOP_WAIT_S))


async def _serve(server: Any, sock: socket.socket, line: str) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(line, flush=True)
    await task


def serve(config: ServeConfig) -> int:
    """Serve the config here, or on Ray Serve with --replicas N."""
    if config.replicas:
        from nectar_runtime.serve.ray_serve import run_on_ray

        return run_on_ray(config)
    return run_here(config)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`python -m nectar_runtime.serve` and `nectar-export serve`: errors as one `error:` line, exit 2."""
    try:
        cli = parser()
        if prog:
            cli.prog = prog
        return serve(config_from_args(cli.parse_args(argv)))
    except NectarError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
