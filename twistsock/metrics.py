"""
C{--metrics ENDPOINT}: Prometheus text at C{/metrics}, and C{/healthz}.

Nothing is counted through C{prometheus_client} on the hot path: the
connections and datagram ports keep plain tallies, and a collector reads them
when Prometheus scrapes.

The endpoint is bounded (L{MetricsSite}): requests have no body, headers are
small, a request must arrive whole before a deadline, and only so many
connections are open at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import logs
from ._types import IStreamTransport
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
        "datagrams": {
            f"{d.name}\t{o}": d.counts[o] for d in datagrams for o in OUTCOMES if d.counts[o]
        },
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
    (
        "connections_active",
        GaugeMetricFamily,
        "Stream connections open now.",
        ["service", "transport"],
    ),
    (
        "connections_refused",
        CounterMetricFamily,
        "Stream connections refused by a limit.",
        ["service", "reason"],
    ),
    ("bytes_received", CounterMetricFamily, "Bytes received on stream connections.", ["service"]),
    ("bytes_sent", CounterMetricFamily, "Bytes sent on stream connections.", ["service"]),
    (
        "tls_handshake_failures",
        CounterMetricFamily,
        "TLS handshakes that failed or timed out.",
        ["service"],
    ),
    (
        "datagrams",
        CounterMetricFamily,
        "Datagrams received, by what became of them.",
        ["service", "outcome"],
    ),
    (
        "log_lines_dropped",
        CounterMetricFamily,
        "Log lines dropped because the log output did not keep up.",
        [],
    ),
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

    def render_HEAD(self, request) -> bytes:
        return _head(self.render_GET(request), request)


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

    def render_HEAD(self, request) -> bytes:
        return _head(self.render_GET(request), request)


def _head(body: bytes, request: Any) -> bytes:
    """
    A HEAD answer: GET's headers and length, no body (else Twisted logs a
    warning per request).
    """
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return b""


#: Seconds a metrics connection has to send one whole request: from connecting, or
#: from the end of the previous response.  Data does not push it back (a client
#: that trickles is closed like a silent one); it is also how long an idle
#: keep-alive connection stays open.  Prometheus's default scrape_timeout is 10 s.
DEFAULT_METRICS_TIMEOUT = 10.0

#: Metrics connections open at once; more are closed as they are accepted.
DEFAULT_METRICS_CONNECTIONS = 64

_REASONS = {
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class _MetricsChannel(HTTPChannel):
    """
    HTTP/1.1 for scrapers: Twisted's channel with every input bounded.

    A request with a body (any C{Content-Length} but 0, or C{chunked}), or with
    a method other than GET or HEAD, is answered 413 or 405 as soon as its
    headers are in, and the connection is closed without reading the body
    (Twisted would read it into memory, then into a temporary file, however
    large it is).  Twisted's own bounds on the request line and headers are
    stated here so that they stay: a longer request line is answered 414, a
    longer header line 431, more headers or bytes 400.
    """

    MAX_LENGTH = 8192  # one request or header line
    totalHeadersSize = 16384  # request line and headers together
    maxHeaders = 64
    site: MetricsSite
    transport: IStreamTransport
    _rejected = False
    _lateAbort = None

    def connectionMade(self) -> None:
        self.site.openConnections += 1
        super().connectionMade()

    def resetTimeout(self) -> None:
        """Data does not push the deadline back (Twisted's channel resets it on every read)."""

    def timeoutConnection(self) -> None:
        """
        Close at the deadline, without Twisted's log line for each: an idle
        scraper's connection between two scrapes is not news.
        """
        self.loseConnection()
        self._lateAbort = self.callLater(self.abortTimeout, self.transport.abortConnection)

    def allHeadersReceived(self) -> None:
        if self._command not in (b"GET", b"HEAD"):
            self._reject(405, b"Allow: GET, HEAD\r\n")
        elif self.length != 0:  # None: chunked
            self._reject(413)
        else:
            super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._rejected:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._rejected:
            super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted's channel knows the method only once a request line is in.
        self._reject(431 if hasattr(self, "_command") else 414)

    def _reject(self, code: int, headers: bytes = b"") -> None:
        """Answer C{code} and close; nothing more is read."""
        self._rejected = True
        reason = _REASONS[code]
        body = b"" if getattr(self, "_command", None) == b"HEAD" else b"%d %s\n" % (code, reason)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n%s"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, reason, headers, len(body), body)
        )
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.openConnections -= 1
        if self._lateAbort is not None and self._lateAbort.active():
            self._lateAbort.cancel()
        super().connectionLost(reason)


class _Refused(Protocol):
    """A connection over the limit: closed as it is accepted."""

    transport: IStreamTransport

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class MetricsSite(Site):
    """
    A web site whose connections are L{_MetricsChannel}s, at most
    C{maxConnections} open at once; the ones beyond are closed as they are
    accepted, and counted in C{refusedConnections}.
    """

    # HTTPFactory types its protocol as Twisted's generic channel wrapper;
    # setting an HTTPChannel subclass is how Twisted documents a custom one.
    protocol = _MetricsChannel  # type: ignore[assignment]
    noisy = False
    openConnections = 0
    refusedConnections = 0

    def __init__(
        self,
        resource: Resource,
        *,
        timeout: float = DEFAULT_METRICS_TIMEOUT,
        maxConnections: int = DEFAULT_METRICS_CONNECTIONS,
        reactor: object = None,
    ) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.maxConnections = maxConnections

    # HTTPFactory says it builds only its generic channel wrapper; a factory
    # may build any protocol, and this one builds _Refused too.
    def buildProtocol(self, addr: object) -> Protocol:  # type: ignore[override]
        if self.openConnections >= self.maxConnections:
            self.refusedConnections += 1
            return _Refused()
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        """Scrapes are not worth a log line each."""


class _SiteCollector:
    """The metrics endpoint's own counts."""

    def __init__(self, site: MetricsSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "twistsock_metrics_connections_refused",
            "Connections to the metrics endpoint closed at once because as many as allowed "
            "were open.",
            value=self.site.refusedConnections,
        )


def metricsSite(
    snapshot: Callable[[], Tallies],
    healthy: Callable[[], bool],
    *,
    timeout: float = DEFAULT_METRICS_TIMEOUT,
    maxConnections: int = DEFAULT_METRICS_CONNECTIONS,
    reactor: object = None,
) -> MetricsSite:
    """
    The web site of C{--metrics}: C{/metrics} and C{/healthz} (503 while
    draining), bounded as L{MetricsSite} and L{_MetricsChannel} say.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TalliesCollector(snapshot))
    ProcessCollector(registry=registry)
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"healthz", _Health(healthy))
    site = MetricsSite(root, timeout=timeout, maxConnections=maxConnections, reactor=reactor)
    registry.register(_SiteCollector(site))
    return site
