"""One worker thread per backend: a Generator owns one ONNX Runtime session and one sequence and is not
thread-safe, so each runs its requests one at a time, in arrival order, from a bounded queue.

A request becomes a Job: its prompt ids, Sampling, stop strings, deadline, a cancel flag and `send`, the
thread-safe channel its events go back on (Started, Text, Done or Failed, in that order; Done or Failed is always
the last). The worker asks the job before every one-token step whether to go on (a client that left sets the
flag; the deadline passing ends it too), so neither keeps generating for nobody.

A model id is an Entry: the worker, the pack it needs bound (None for a single-file bundle) and the bundle whose
template and window its prompts take. A base's worker serves every pack on it and binds the entry's pack before a
request whose pack is not the active one.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from nectar_runtime.errors import NectarError, NectarInternalError
from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
from nectar_runtime.serve.metrics import Metrics

if TYPE_CHECKING:
    from nectar_runtime.serve.models import Entry


class QueueFull(Exception):
    """The backend's queue holds as many waiting requests as `--queue` allows (429)."""


class Stopping(Exception):
    """The worker is shutting down and takes no more requests (503)."""


@dataclass(frozen=True)
class Started:
    queue_ms: float
    switch_ms: float


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    """How a generation ended and what it took; `finish` is stop, length, cancelled or timeout."""

    finish: str
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float = 0.0
    ms_per_token: float = 0.0
    queue_ms: float = 0.0
    switch_ms: float = 0.0


@dataclass(frozen=True)
class Failed:
    message: str
    code: str = "generation_failed"             # or "stopping": the server stopped before it ran


Event = Started | Text | Done | Failed


@dataclass
class Job:
    """One admitted request and the channel its events go back on."""

    entry: "Entry"
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    deadline: float                             # time.monotonic()
    send: Callable[[Event], None]
    arrived: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def model(self) -> str:
        return self.entry.name

    def timed_out(self) -> bool:
        return time.monotonic() >= self.deadline

    def stopped(self) -> bool:
        """Whether to stop now: the client left or the deadline passed."""
        return self.cancel.is_set() or self.timed_out()

    def ended(self) -> str:
        """Why a stopped job stopped: its deadline passed (whoever noticed first), or its client left."""
        return "timeout" if self.timed_out() else "cancelled"


class StopText:
    """OpenAI's `stop` strings on streamed text: emits what cannot begin a stop string, cuts at the first match."""

    def __init__(self, stops: Iterable[str]):
        self.stops, self.held, self.hit = tuple(s for s in stops if s), "", False

    def push(self, delta: str) -> str:
        """The text safe to send after `delta`; sets `hit` (and drops the rest) once a stop string appears."""
        text = self.held + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Worker:
    """A Generator and the one thread that runs it; `submit` admits a Job or raises QueueFull."""

    def __init__(self, name: str, generator: Generator, capacity: int, metrics: Metrics):
        self.name, self.generator, self.capacity, self.metrics = name, generator, capacity, metrics
        self.waiting: deque[Job] = deque()
        self.busy = False
        self.current: Job | None = None
        self.closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"nectar-worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue the job; QueueFull when `capacity` requests already wait beside the one generating."""
        with self._cond:
            if self.closing:
                raise Stopping(self.name)
            if len(self.waiting) + self.busy > self.capacity:
                raise QueueFull(self.name)
            self.waiting.append(job)
            self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """(waiting, running) now."""
        with self._cond:
            return len(self.waiting), int(self.busy)

    def stop(self, wait_s: float = 10.0) -> None:
        """End the running request at its next token, fail the waiting ones, then release the session."""
        with self._cond:
            self.closing = True
            left, self.waiting = list(self.waiting), deque()
            if self.current is not None:
                self.current.cancel.set()
            self._cond.notify_all()
        for job in left:
            job.send(Failed("the server is stopping", "stopping"))
        if self._thread.is_alive():
            self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.generator.close()

    def _next(self) -> Job | None:
        with self._cond:
            while not self.waiting and not self.closing:
                self._cond.wait()
            if self.closing:
                return None
            self.busy = True
            self.current = self.waiting.popleft()
            return self.current

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._serve(job)
            except NectarError as exc:          # the bundle's fault (damaged weights), not the request's
                self._fail(job, str(exc))
            except Exception:                   # a bug: keep the traceback in the log, answer one line
                traceback.print_exc(file=sys.stderr)
                self._fail(job, "internal error in the worker; see the server's log")
            finally:
                with self._cond:
                    self.busy, self.current = False, None

    def _fail(self, job: Job, message: str) -> None:
        self.metrics.inc("nectar_generations_total", model=job.model, finish="error")
        job.send(Failed(message))

    def _serve(self, job: Job) -> None:
        queue_ms = (time.monotonic() - job.arrived) * 1e3
        self.metrics.observe("nectar_queue_milliseconds", [queue_ms], model=job.model)
        if job.stopped():                       # left or timed out while waiting: nothing to run
            self._done(job, Done(job.ended(), len(job.prompt), 0, queue_ms=queue_ms))
            return
        switch_ms = self.activate(job.entry.pack)
        job.send(Started(queue_ms, switch_ms))
        stops = StopText(job.stop)
        for delta in self.generator.stream_ids(job.prompt, job.sampling, cancelled=job.stopped):
            if text := stops.push(delta):
                job.send(Text(text))
            if stops.hit:
                break
        if tail := stops.flush():
            job.send(Text(tail))
        self._done(job, self._outcome(job, stops.hit, queue_ms, switch_ms))

    def _outcome(self, job: Job, hit: bool, queue_ms: float, switch_ms: float) -> Done:
        result = self.generator.last
        if result is None:
            raise NectarInternalError("the token loop ended without recording its result")
        finish = {"stop": "stop", "length": "length", "window": "length"}.get(result.finish, job.ended())
        return Done("stop" if hit else finish, len(result.prompt_ids), len(result.token_ids), result.prefill_ms,
                    result.median_ms if result.token_ms else 0.0, queue_ms, switch_ms)

    def _done(self, job: Job, done: Done) -> None:
        m, model = self.metrics, job.model
        m.inc("nectar_generations_total", model=model, finish=done.finish)
        if done.completion_tokens:
            m.inc("nectar_prompt_tokens_total", done.prompt_tokens, model=model)
            m.inc("nectar_completion_tokens_total", done.completion_tokens, model=model)
            m.observe("nectar_prefill_milliseconds", [done.prefill_ms], model=model)
            m.observe("nectar_token_milliseconds", self.generator.last.token_ms if self.generator.last else [],
                      model=model)
        job.send(done)

    def activate(self, pack: Any | None) -> float:
        """Bind `pack` when another one is active (a base's worker); the milliseconds it took, 0 when none."""
        if pack is None or self.generator.pack is pack:
            return 0.0
        switch_ms = self.generator.use(pack)                     # rebinds the pack on the same session
        self.metrics.observe("nectar_pack_switch_milliseconds", [switch_ms], backend=self.name)
        return switch_ms
