"""
C{[SERVICE@]ENDPOINT} to a listening service.

ENDPOINT is any Twisted server endpoint string, or
C{udp:PORT[:interface=ADDR]}.  The service name is the text before C{@}, when
the text before the first C{:} contains one; otherwise the service is
C{echo}.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logs
from ._accepts import AcceptErrors, openDescriptors, raiseOpenFileLimit
from ._format import describe, errorText, splitEndpoint
from ._tlsdirect import useDirectTLS
from .connection import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    ConnectionFactory,
    Connections,
    transportOf,
    unwrap,
)
from .endpoints import serverFromString
from .metrics import Tallies, metricsSite, tallies
from .services import DATAGRAM_SERVICES, SERVICES, ServiceConfig, ServiceFactory, summarizeDatagrams
from .udp import DatagramEndpoint, DatagramPolicy, DatagramServer, defaultInterface, parseUDP

DEFAULT_SERVICE = "echo"


@dataclass(frozen=True)
class ListenSpec:
    """One C{--listen} argument: a service name and a server endpoint string."""

    service: str
    endpoint: str

    def __str__(self) -> str:
        return f"{self.service}@{self.endpoint}"


def parseListen(text: str) -> ListenSpec:
    """
    Split C{[SERVICE@]ENDPOINT} and check both parts.

    @raise ValueError: unknown service or malformed endpoint string, with a
        message fit for a usage error.
    """
    head = text.split(":", 1)[0]
    service, endpoint = text.split("@", 1) if "@" in head else (DEFAULT_SERVICE, text)
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r} in {text!r} (known: {', '.join(SERVICES)})")
    if not endpoint:
        raise ValueError(f"no endpoint in {text!r}")
    wrappers, kind, rest = unwrap(endpoint)
    if kind == "udp":
        try:
            if wrappers:
                raise ValueError("a PROXY header cannot come before datagrams")
            parseUDP(endpoint)
        except ValueError as e:
            raise ValueError(f"bad endpoint {endpoint!r}: {errorText(e)}") from None
    else:
        checkEndpoint(endpoint)
    return ListenSpec(service, endpoint)


def isUDP(spec: ListenSpec) -> bool:
    """Whether a --listen is a datagram one."""
    return unwrap(spec.endpoint)[1] == "udp"


def checkEndpoint(endpoint: str) -> None:
    """
    Check a stream server endpoint string before anything listens.

    @raise ValueError: it does not parse, or names unreadable files.
    """
    _checkWrappers(endpoint)
    _, kind, rest = unwrap(endpoint)
    try:
        if kind in _PORTED:
            _checkPort(rest)
        # Endpoint parsers only record the reactor; parsing with a stand-in
        # checks the syntax (and reads certificate files) before any reactor
        # is installed, so `twist --reactor=...` still works.
        serverFromString(_ParseOnlyReactor(), endpoint)
    except Exception as e:  # every parser error is a usage error here
        hint = ""
        if kind == "systemd" and "LISTEN_FDNAMES" not in os.environ:
            hint = (
                " (no sockets named by systemd: Twisted needs LISTEN_FDNAMES, i.e. "
                "FileDescriptorName= in the .socket unit or --fdname for systemd-socket-activate)"
            )
        raise ValueError(f"bad endpoint {endpoint!r}: {_parserError(kind, e)}{hint}") from None


def _parserError(kind: str, e: Exception) -> str:
    """A Twisted endpoint parser's error, in the words of the endpoint string."""
    text = errorText(e)
    unknown = re.search(r"got an unexpected keyword argument '(\w+)'", text)
    if isinstance(e, TypeError) and unknown:
        return f"{kind}: no parameter {unknown[1]!r}"
    twice = re.search(r"got multiple values for argument '(\w+)'", text)
    if isinstance(e, TypeError) and twice:
        return (
            f"{kind}: {twice[1]} given more than once (a colon in a value is written \\:, "
            "as in interface=\\:\\:1)"
        )
    if kind == "unix" and "with base 8" in text:
        return "unix: mode is octal digits, as in mode=660"
    return text


def _checkWrappers(endpoint: str) -> None:
    """
    Refuse Twisted's C{haproxy:} (in any case, anywhere in the string's
    wrappers) and a PROXY header asked for twice.  Twisted's wrapper loses a
    reply sent after the client half-closes and hides the TLS handshake;
    twistsock's C{proxy:} has neither fault.
    """
    parts = endpoint.split(":")
    names = []
    for part in parts:
        if part.lower() not in ("proxy", "haproxy"):
            break
        names.append(part.lower())
    inner = ":".join(parts[len(names) :])
    if "haproxy" in names:
        raise ValueError(
            f"{endpoint!r}: haproxy: is not served (Twisted's wrapper loses replies after a "
            f"half-close); use proxy:{inner}"
        )
    if len(names) > 1:
        raise ValueError(f"{endpoint!r}: one PROXY header per connection: use proxy:{inner}")


# Endpoint types whose first argument (or port=) is a TCP port.
_PORTED = ("tcp", "tcp6", "ssl", "mtls")


def _checkPort(rest: str) -> None:
    """A port out of range is found here, before anything listens, not by bind() once others do."""
    fields = splitEndpoint(rest)
    positional = [f for f in fields if "=" not in f]
    named = [f[len("port=") :] for f in fields if f.startswith("port=")]
    for port in positional[:1] + named:
        if not port.isdigit():
            raise ValueError(f"port {port!r} is not a number")
        if int(port) > 65535:
            raise ValueError(f"port {port} is not between 0 and 65535")


class _ParseOnlyReactor:
    """A reactor stand-in for parsing endpoint strings; it has no methods."""

    def __getattr__(self, name: str) -> object:
        raise AttributeError(f"endpoint parsers only store the reactor; {name} used while parsing")


class Endpoint(Protocol):
    """
    What a L{ListeningService} listens on: a stream server endpoint, given a
    protocol factory, or a L{DatagramEndpoint}, given a L{DatagramServer}.
    """

    def listen(self, factory: Any, /) -> Deferred[IListeningPort]: ...


class ListenFailed(Exception):
    """A listening service could not listen; the message is one line for the user."""


class ListeningService(Service):
    """
    Listen on one endpoint with one service while running; log the real
    address once listening.

    Listening starts in L{privilegedStartService} (C{twistd}) or
    L{startService} (C{twist}).  A failure there, which is synchronous for
    every endpoint Twisted ships, raises L{ListenFailed}; a later failure
    calls C{onFailure} with the message.
    """

    log = Logger()
    port: IListeningPort | None = None
    acceptErrors: AcceptErrors | None = None

    def __init__(
        self,
        spec: ListenSpec,
        endpoint: Endpoint,
        factory: IProtocolFactory | DatagramServer,
        onFailure: Callable[[str], None],
        worker: int | None = None,
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.endpoint = endpoint
        self.factory = factory
        self.onFailure = onFailure
        #: The port, or None if listening failed.
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is not None:
            return
        failedNow: list[str] = []
        starting = True

        def listening(port: IListeningPort) -> IListeningPort | None:
            self.port = port
            useDirectTLS(port)
            connections = getattr(self.factory, "connections", None)
            if connections is not None:
                self.acceptErrors = AcceptErrors.watch(
                    port,
                    connections.reactor,
                    self.spec.service,
                    self.spec.endpoint,
                    connections.refused,
                )
            self.log.info(
                "{service} listening on {address} ({endpoint})"
                if self.worker is None
                else "{service} served by worker {worker} on {address} ({endpoint})",
                service=self.spec.service,
                address=describe(port.getHost()),
                endpoint=self.spec.endpoint,
                worker=self.worker,
            )
            return port

        def failed(reason: Failure) -> IListeningPort | None:
            message = (
                f"cannot listen on {self.spec.endpoint} ({self.spec.service}): "
                f"{errorText(reason.value)}"
            )
            if starting:
                failedNow.append(message)
            else:
                self.onFailure(message)
            return None

        self._listening = self.endpoint.listen(self.factory).addCallbacks(listening, failed)
        starting = False
        if failedNow:
            raise ListenFailed(failedNow[0])

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if self.acceptErrors is not None:
            self.acceptErrors.stop()
        if listening is None:
            return None
        listening.cancel()

        def stop(port: IListeningPort | None) -> Deferred[None] | None:
            return port.stopListening() if port is not None else None

        return listening.addCallback(stop)


class SocketsService(MultiService):
    """
    The listening services of one C{twist sockets}, and what they share: the
    registry of connections and the metrics.

    Start: if any service cannot listen, the others are closed, one line
    goes to standard error, and the process exits with status 1.  Stop
    (SIGTERM, SIGINT): every port stops listening at once, open connections
    have C{drainTimeout} seconds to finish, then the rest are closed; the
    metrics endpoint answers until the end (C{/healthz} says C{draining}).
    """

    log = Logger()
    metrics: ListeningService | None = None

    def __init__(
        self,
        reactor: object = None,
        connections: Connections | None = None,
        drainTimeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.connections = connections if connections is not None else Connections(reactor)
        self.drainTimeout = drainTimeout

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def serveMetrics(self, endpoint: str) -> None:
        """Serve /metrics and /healthz on a (checked) server endpoint string."""
        self.metrics = ListeningService(
            ListenSpec("metrics", endpoint),
            serverFromString(self.reactor, endpoint),
            metricsSite(self.tallies, self.healthy),
            self.fail,
        )
        self.metrics.setServiceParent(self)

    def tallies(self) -> Tallies:
        """Every count the metrics show, for this process."""
        datagrams = [c.factory for c in self if isinstance(c.factory, DatagramServer)]
        return tallies(self.connections, datagrams)

    def healthy(self) -> bool:
        return bool(self.running) and not self.connections.draining

    def privilegedStartService(self) -> None:
        self._raiseOpenFileLimit()
        self._start(super().privilegedStartService)

    def startService(self) -> None:
        self._raiseOpenFileLimit()
        self._start(super().startService)
        self.connections.start()
        # Whatever the log still holds is written before the process ends.
        self.reactor.addSystemEventTrigger("after", "shutdown", logs.finish)
        # The reactor installs its signal handlers as it starts: the first
        # turn of its loop is the first moment a SIGTERM stops us cleanly.
        self.reactor.callWhenRunning(self.reactor.callLater, 0, self._ready)

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        self.connections.summarizeRefusals()
        summarizeDatagrams()
        ports = [c for c in reversed(list(self)) if c is not self.metrics]
        stopped = defer.DeferredList([defer.maybeDeferred(c.stopService) for c in ports])
        drained = stopped.addCallback(lambda _: self.connections.drain(self.drainTimeout))
        metrics = self.metrics
        if metrics is not None:
            drained.addCallback(lambda _: metrics.stopService())
        return drained.addCallback(lambda _: None)

    _limitChecked = False

    def _raiseOpenFileLimit(self) -> None:
        """
        Every connection is a descriptor: allow as many as the hard limit does,
        and say if that is fewer than --max-connections.
        """
        if self._limitChecked:
            return
        self._limitChecked = True
        before, after = raiseOpenFileLimit()
        if after != before:
            self.log.info(
                "open-file limit raised from {before} to {after}", before=before, after=after
            )
        wanted = self.connections.maxConnections
        # Descriptors open already (the log, the reactor's, Twisted's spare one for
        # running out), and those each listening port will take.
        inUse = openDescriptors() + len(list(self)) + 1
        if wanted and wanted + inUse > after:
            self.log.warn(
                "the open-file limit ({limit}) is below --max-connections {wanted}: "
                "connections beyond about {usable} will be refused (raise LimitNOFILE= or "
                "ulimit -n)",
                limit=after,
                wanted=wanted,
                usable=max(0, after - inUse),
            )

    def _ready(self) -> None:
        self.catchSignals()
        self.log.info(
            "ready: {count} listening ({reactor})",
            count=len([c for c in self if c is not self.metrics]),
            reactor=type(self.reactor).__name__,
        )

    def catchSignals(self) -> None:
        """
        SIGTERM and SIGINT: drain and stop (the first one; see
        L{firstSignalOnly}).  SIGHUP: reopen the log file and go on
        (L{hangup}).  SIGUSR1, SIGUSR2: logged and ignored.  (Their default
        action would end the process at once, without draining.)
        """
        firstSignalOnly()
        if threading.current_thread() is not threading.main_thread() or logs.current is None:
            return  # not under twist: twistd has its own (SIGUSR1 rotates its log)
        signal.signal(signal.SIGHUP, lambda number, frame: self.reactor.callFromThread(self.hangup))
        for number in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(
                number, lambda number, frame: self.reactor.callFromThread(self._ignored, number)
            )

    def hangup(self) -> None:
        """SIGHUP: open the log file again by its name (for logrotate); serving goes on."""
        try:
            reopened = logs.current is not None and logs.current.reopen()
        except OSError as e:
            self.log.warn("SIGHUP: cannot reopen the log file: {error}", error=errorText(e))
            return
        self.log.info(
            "SIGHUP: {what}",
            what="log file reopened"
            if reopened
            else "no log file to reopen (the log goes to standard output)",
        )

    def _ignored(self, number: int) -> None:
        self.log.info("{name} ignored", name=signal.Signals(number).name)

    def _start(self, start: Callable[[], None]) -> None:
        try:
            start()
        except ListenFailed as e:
            for child in self:
                child.stopService()
            self.running = False
            sys.stderr.write(f"twistsock: error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    def fail(self, message: str) -> None:
        """A listen that failed after start-up: log it and exit with status 1."""
        self.log.critical("{message}", message=message)
        self.reactor.addSystemEventTrigger("after", "shutdown", _exitNow, 1)
        self.reactor.stop()


def firstSignalOnly() -> None:
    """
    Let only the first SIGTERM or SIGINT reach the reactor's handlers.  A
    later SIGTERM is ignored: systemd sends one to every process of a unit
    as the master sends its own to the workers, and Twisted logs a traceback
    for a second reactor.stop().  A later SIGINT (a second Ctrl-C) ends the
    process at once, as the user means.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    first: list[int] = []
    handlers: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {
        number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)
    }

    def once(number: int, frame: FrameType | None) -> None:
        if not first:
            first.append(number)
            handler = handlers[number]
            if callable(handler):
                handler(number, frame)
        elif number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    for number, handler in handlers.items():
        if callable(handler):
            signal.signal(number, once)


def _exitNow(status: int) -> None:
    """End the process with C{status} once the reactor has shut down."""
    import os

    logs.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def listeningService(
    spec: ListenSpec,
    config: ServiceConfig,
    onFailure: Callable[[str], None],
    *,
    connections: Connections | None = None,
    handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    datagrams: DatagramPolicy = DatagramPolicy(),
    summaryInterval: float = 60.0,
    reactor: object = None,
    worker: int | None = None,
) -> ListeningService:
    """
    Build the service that listens for C{spec}: with the running reactor, or
    with C{reactor} standing in for it to parse the endpoint (a worker's
    adopting reactor).
    """
    from twisted.internet import reactor as running

    endpointReactor = reactor if reactor is not None else running
    reactor = running
    if isUDP(spec):
        port, interface = parseUDP(spec.endpoint)
        endpoint: Endpoint = DatagramEndpoint(
            reactor, port, interface or defaultInterface(), summaryInterval
        )
        server = DatagramServer(
            spec.service, DATAGRAM_SERVICES[spec.service], datagrams, reactor.seconds
        )
        return ListeningService(spec, endpoint, server, onFailure)
    endpoint = serverFromString(endpointReactor, spec.endpoint)
    factory = ConnectionFactory(
        ServiceFactory(spec.service, config),
        transportOf(spec.endpoint),
        connections=connections,
        handshakeTimeout=handshakeTimeout,
        reactor=reactor,
        worker=worker,
    )
    return ListeningService(spec, endpoint, factory, onFailure, worker)
