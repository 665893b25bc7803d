"""
C{--metrics ENDPOINT}: Prometheus text at C{/metrics}, and C{/healthz}.

Nothing is counted through C{prometheus_client} on the hot path: the
connections and datagram ports keep plain tallies, and a collector reads them
when Prometheus scrapes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import logs
from .connection import Connections
from .udp import OUTCOMES, DatagramServer

#: A snapshot of every tally: what a worker sends to its master (see L{twistsock.workers}).
Tallies = dict[str, dict[str, float]]


def tallies(connections: Connections, datagrams: Iterable[DatagramServer]) -> Tallies:
    """Every tally of this process, keyed by metric and then by its labels joined with a tab."""
    return {
        "connections": {f"{s}\t{t}": n for (s, t), n in connections.opened.items()},
        "connections_active": {f"{s}\t{t}": n for (s, t), n in connections.activeBy.items()},
        "connections_refused": {f"{s}\t{r}": n for (s, r), n in connections.refused.items()},
        "bytes_received": dict(connections.bytesIn()),
        "bytes_sent": dict(connections.bytesOut()),
        "tls_handshake_failures": dict(connections.handshakeFailures),
        "datagrams": {f"{d.name}\t{o}": d.counts[o] for d in datagrams for o in OUTCOMES if d.counts[o]},
        "log_lines_dropped": {"": logs.droppedLines()},
    }


def add(total: Tallies, more: Tallies) -> Tallies:
    """The sum of two snapshots."""
    out = {name: dict(values) for name, values in total.items()}
    for name, values in more.items():
        into = out.setdefault(name, {})
        for labels, value in values.items():
            into[labels] = into.get(labels, 0) + value
    return out


_FAMILIES = [
    ("connections", CounterMetricFamily, "Stream connections accepted.", ["service", "transport"]),
    ("connections_active", GaugeMetricFamily, "Stream connections open now.", ["service", "transport"]),
    ("connections_refused", CounterMetricFamily, "Stream connections refused by a limit.", ["service", "reason"]),
    ("bytes_received", CounterMetricFamily, "Bytes received on stream connections.", ["service"]),
    ("bytes_sent", CounterMetricFamily, "Bytes sent on stream connections.", ["service"]),
    ("tls_handshake_failures", CounterMetricFamily, "TLS handshakes that failed or timed out.", ["service"]),
    ("datagrams", CounterMetricFamily, "Datagrams received, by what became of them.", ["service", "outcome"]),
    ("log_lines_dropped", CounterMetricFamily, "Log lines dropped because the log output did not keep up.", []),
]


class TalliesCollector:
    """A Prometheus collector over a function that returns L{Tallies}."""

    def __init__(self, snapshot: Callable[[], Tallies]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        values = self.snapshot()
        for name, family, documentation, labels in _FAMILIES:
            metric = family(f"twistsock_{name}", documentation, labels=labels)
            for key, value in sorted(values.get(name, {}).items()):
                metric.add_metric(key.split("\t") if key else [], value)
            yield metric


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class _Health(Resource):
    isLeaf = True

    def __init__(self, healthy: Callable[[], bool]) -> None:
        super().__init__()
        self.healthy = healthy

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if self.healthy():
            return b"ok\n"
        request.setResponseCode(503)
        return b"draining\n"


def metricsSite(snapshot: Callable[[], Tallies], healthy: Callable[[], bool]) -> Site:
    """The web site of C{--metrics}: C{/metrics} and C{/healthz} (503 while draining)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TalliesCollector(snapshot))
    ProcessCollector(registry=registry)
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"healthz", _Health(healthy))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # scrapes are not worth a log line each
    return site
