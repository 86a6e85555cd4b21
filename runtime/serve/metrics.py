"""The server's counters and histograms, written by hand in Prometheus' text format (version 0.0.4) for
`GET /metrics`: no client library, so the edge install stays small.

    nectar_requests_total{model,status}          chat completion requests by model id and HTTP status
    nectar_generations_total{model,finish}       generations by how they ended: stop, length, cancelled, timeout,
                                                 error (a stream's status is 200 whatever its end)
    nectar_prompt_tokens_total{model}, nectar_completion_tokens_total{model}
    nectar_prefill_milliseconds{model}           histogram: the prompt's one step
    nectar_token_milliseconds{model}             histogram: every one-token step
    nectar_queue_milliseconds{model}             histogram: admission to the worker taking it
    nectar_pack_switch_milliseconds{backend}     histogram: binding another pack on a base's worker
    nectar_queue_depth{backend}, nectar_running{backend}   gauges, read when scraped

A request for an unknown model id counts under model="" (ids a client makes up are not labels).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

PREFILL_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
TOKEN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
QUEUE_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000)
SWITCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

Labels = tuple[tuple[str, str], ...]


def escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{escape(v)}"' for k, v in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Histogram:
    """Cumulative buckets in the Prometheus sense, with sum and count, for one label set."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)          # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Labels) -> Iterable[str]:
        running = 0
        for bound, count in zip((*map(number, self.bounds), "+Inf"), self.counts):
            running += count
            le = 'le="' + bound + '"'
            yield f"{name}_bucket{label_text(labels, le)} {running}"
        yield f"{name}_sum{label_text(labels)} {number(round(self.total, 3))}"
        yield f"{name}_count{label_text(labels)} {self.count}"


@dataclass(frozen=True)
class Family:
    """One metric's name, type, help line and (for histograms) bucket bounds."""

    name: str
    kind: str                       # counter | gauge | histogram
    help: str
    bounds: tuple[float, ...] = ()


FAMILIES = {f.name: f for f in (
    Family("nectar_requests_total", "counter", "Chat completion requests by model id and HTTP status."),
    Family("nectar_generations_total", "counter", "Generations by model id and how they ended."),
    Family("nectar_prompt_tokens_total", "counter", "Prompt tokens prefilled."),
    Family("nectar_completion_tokens_total", "counter", "Answer tokens generated."),
    Family("nectar_prefill_milliseconds", "histogram", "Prefill step of a request's prompt.", PREFILL_BUCKETS),
    Family("nectar_token_milliseconds", "histogram", "One-token decode steps.", TOKEN_BUCKETS),
    Family("nectar_queue_milliseconds", "histogram", "Wait from admission to the worker.", QUEUE_BUCKETS),
    Family("nectar_pack_switch_milliseconds", "histogram", "Pack switches on a base's worker.", SWITCH_BUCKETS),
    Family("nectar_queue_depth", "gauge", "Requests waiting per backend worker."),
    Family("nectar_running", "gauge", "Requests generating per backend worker (0 or 1)."),
)}


class Metrics:
    """Thread-safe counters and histograms (the workers and the event loop both write); gauges are callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}
        self._gauges: list[Callable[[], Iterable[tuple[str, Labels, float]]]] = []

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (FAMILIES[name].name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, values: Iterable[float], **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            histogram = self._histograms.setdefault(key, Histogram(FAMILIES[name].bounds))
            for value in values:
                histogram.observe(value)

    def gauge(self, read: Callable[[], Iterable[tuple[str, Labels, float]]]) -> None:
        """Register a callback that yields (name, labels, value) for gauges, asked at every scrape."""
        self._gauges.append(read)

    def counter(self, name: str, **labels: str) -> float:
        """A counter's value now (0 when never incremented): tests and the bench read these."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        """Every family in the text format; a family with no samples yet keeps its HELP and TYPE lines."""
        with self._lock:
            samples: dict[str, list[str]] = {name: [] for name in FAMILIES}
            for (name, labels), value in sorted(self._counters.items()):
                samples[name].append(f"{name}{label_text(labels)} {number(value)}")
            for (name, labels), histogram in sorted(self._histograms.items(), key=lambda kv: kv[0]):
                samples[name].extend(histogram.lines(name, labels))
        for read in self._gauges:
            for name, labels, value in read():
                samples[name].append(f"{name}{label_text(labels)} {number(value)}")
        out = []
        for family in FAMILIES.values():
            out += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}", *samples[family.name]]
        return "\n".join(out) + "\n"
