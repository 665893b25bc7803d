"""
What twistsock adds around every stream service, beside it rather than inside
it: one record per connection when it ends; limits on connections, in all and
per client; an idle timeout; for TLS a handshake deadline and the verified
client certificate; the tallies the metrics are made of; and draining at
shutdown.

The bookkeeping is cheap on purpose: a read adds to a byte count, and no
timer is armed per read.  One sweep a second (at most) sees which counts
moved and closes idle connections.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import logs
from ._direct import loseDirectly, writeDirectly
from ._format import describe, errorText, oneLine
from ._layer import Layer

if TYPE_CHECKING:
    from OpenSSL.crypto import X509


#: Seconds a TLS client has to finish its handshake, unless told otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Seconds without a byte from the peer before a connection is closed (the classic echo
#: server's 30 s select()).
DEFAULT_IDLE_TIMEOUT = 30.0
#: Seconds open connections have to finish after SIGTERM.
DEFAULT_DRAIN_TIMEOUT = 10.0
#: Seconds a client of upper or ack has to send a whole line, from its first byte.
DEFAULT_LINE_TIMEOUT = 10.0
#: Seconds a connection to a proxy: endpoint has to send its PROXY header, from accept.
DEFAULT_PROXY_TIMEOUT = 5.0
#: Per-peer limits count IPv4 clients by address and IPv6 clients by /64 (what
#: one client usually owns).
DEFAULT_PEER_PREFIXES = (32, 64)
#: Connections served at once, over all listening ports.
DEFAULT_MAX_CONNECTIONS = 10000

# Why a connection ended, as the record says it.
PEER_CLOSED = "peer closed"
SERVICE_CLOSED = "service closed"
ERROR = "error"
IDLE_TIMEOUT = "idle timeout"
LIMIT = "limit"
SHUTDOWN = "server shutdown"
HANDSHAKE_FAILED = "tls handshake failed"
HANDSHAKE_TIMEOUT = "tls handshake timeout"
LINE_TIMEOUT = "line timeout"
PROXY_TIMEOUT = "proxy header timeout"
PROXY_INVALID = "proxy header invalid"

# Reasons recorded one per burst, the rest summed up (see Connections.recordRefusal).
_SUMMARIZED = frozenset({LIMIT, PROXY_TIMEOUT, PROXY_INVALID})

# Why a connection was refused, as the metrics say it.
REFUSED_TOTAL = "max connections"
REFUSED_PER_PEER = "max per peer"
REFUSED_DRAINING = "shutting down"


@dataclass(frozen=True)
class TransportInfo:
    """What a listening endpoint string says about its connections."""

    #: tcp, tcp6, unix, tls, mtls, proxy, proxy+tls, proxy+mtls, or a plugin's name.
    name: str
    #: Whether TLS ends right beneath the service, so that the handshake is seen.
    tls: bool = False


_BASE = {"tcp": "tcp", "tcp6": "tcp6", "unix": "unix", "ssl": "tls", "tls": "tls", "mtls": "mtls"}
_SYSTEMD = {"INET": "tcp", "INET6": "tcp6", "UNIX": "unix"}


def unwrap(endpoint: str) -> tuple[list[str], str, str]:
    """
    Split C{proxy:ssl:443:...} into its PROXY wrappers, the inner type, and
    that type's arguments.
    """
    wrappers = []
    kind, _, rest = endpoint.partition(":")
    while kind in ("proxy", "haproxy") and rest:
        wrappers.append(kind)
        kind, _, rest = rest.partition(":")
    return wrappers, kind, rest


def transportOf(endpoint: str) -> TransportInfo:
    """Name the transport of a server endpoint string: C{proxy:ssl:443} is C{proxy+tls}."""
    wrappers, kind, rest = unwrap(endpoint)
    if kind == "systemd":
        domain = next((f[len("domain=") :] for f in rest.split(":") if f.startswith("domain=")), "")
        base = _SYSTEMD.get(domain, "systemd")
    else:
        base = _BASE.get(kind, kind)
    tls = base in ("tls", "mtls")
    name = (f"proxy+{base}" if tls else "proxy") if wrappers else base
    # Twisted's haproxy: puts its own wrapper between TLS and us, which hides
    # the handshake; proxy: reads the header beneath TLS.
    return TransportInfo(name, tls and "haproxy" not in wrappers)


class Connections:
    """
    Every stream connection of one server process: limits, idle sweeping,
    draining, and the tallies behind the metrics.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        *,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        maxPerPeer: int = 0,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
        lineTimeout: float = DEFAULT_LINE_TIMEOUT,
        proxyTimeout: float = DEFAULT_PROXY_TIMEOUT,
        peerPrefixes: tuple[int, int] = DEFAULT_PEER_PREFIXES,
    ) -> None:
        self._reactor = reactor
        self.maxConnections = maxConnections
        self.maxPerPeer = maxPerPeer
        self.idleTimeout = idleTimeout
        self.lineTimeout = lineTimeout
        self.proxyTimeout = proxyTimeout
        self.peerPrefixes = peerPrefixes
        self.active: set[Connection] = set()
        self.perPeer: Counter[str] = Counter()
        #: Advanced once per sweep; a connection remembers the tick of its last read.
        self.tick = 0
        timeouts = [t for t in (idleTimeout, lineTimeout, proxyTimeout) if t > 0]
        # At least 50 ms: a deadline shorter than a few ticks is as precise as a tick allows.
        self.tickSeconds = max(0.05, min(1.0, *(t / 4 for t in timeouts))) if timeouts else 1.0
        self._idleTicks = self.ticks(idleTimeout)
        self.lineTicks = self.ticks(lineTimeout)
        self.proxyTicks = self.ticks(proxyTimeout)
        self._sweeper: LoopingCall | None = None
        self.draining = False
        self._drained: defer.Deferred[None] | None = None
        # Tallies for the metrics, by (service, transport) or service.
        self.opened: Counter[tuple[str, str]] = Counter()
        self.activeBy: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.closedBytesIn: Counter[str] = Counter()
        self.closedBytesOut: Counter[str] = Counter()
        self.handshakeFailures: Counter[str] = Counter()
        # Refusals not recorded one by one (see recordRefusal).
        self._unrecorded: Counter[str] = Counter()
        self._burst: Any = None
        self._lastRefusal = self._summarized = 0.0

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def ticks(self, seconds: float) -> int:
        """Whole ticks that make at least C{seconds} (0: no deadline)."""
        return math.ceil(seconds / self.tickSeconds) if seconds > 0 else 0

    def due(self, ticks: int) -> int:
        """
        The tick at whose sweep a deadline of C{ticks} set now has passed:
        never early (the current tick began up to one tick ago), at most one
        tick late.
        """
        return self.tick + ticks + 1

    def peerKeyOf(self, transport: Any) -> str | None:
        """
        What C{--max-per-peer} counts a transport's client by: its address, or
        its network (see L{networkKey}); None without a per-peer limit (the
        peer's address is then not even asked for).
        """
        if not self.maxPerPeer:
            return None
        address = transport.getPeer()
        if not isinstance(address, (IPv4Address, IPv6Address)):
            return None
        return networkKey(address.host, self.peerPrefixes)

    def start(self) -> None:
        """Start sweeping: idle connections, and the deadlines of headers and lines."""
        if (self._idleTicks or self.lineTicks or self.proxyTicks) and self._sweeper is None:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(self.tickSeconds, now=False)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def sweep(self) -> None:
        """
        Advance the tick; close every connection silent for the idle timeout
        (a read in tick K is at most one tick old when tick K+1 begins, so
        silence is only certain from tick K + idle + 1 on), and every one
        past the deadline of the stage it is in.

        A read is not stamped when it happens (that would be work on every
        read): a connection whose byte count moved since the last sweep read
        during the tick that just ended.
        """
        self.tick = tick = self.tick + 1
        oldest = tick - self._idleTicks if self._idleTicks else -1
        late = []
        for c in self.active:
            received = c.bytesIn
            if received != c.sweptBytes:
                c.sweptBytes, c.lastTick = received, tick - 1
            if c.lastTick < oldest or (c.due is not None and c.due <= tick):
                late.append(c)
        for connection in late:
            if connection.due is not None and connection.due <= tick:
                connection.stageTimedOut()
            else:
                connection.closeFor(IDLE_TIMEOUT, f"nothing received for {self.idleTimeout:g} s")

    def admit(self, connection: Connection) -> str | None:
        """Take a new connection in, or say why not."""
        key = (connection.factory.serviceName, connection.factory.transport.name)
        peer = connection.peerKey
        if self.draining:
            reason = REFUSED_DRAINING
        elif self.maxConnections and len(self.active) >= self.maxConnections:
            reason = REFUSED_TOTAL
        elif self.maxPerPeer and peer is not None and self.perPeer[peer] >= self.maxPerPeer:
            reason = REFUSED_PER_PEER
        else:
            self.active.add(connection)
            if peer is not None:
                self.perPeer[peer] += 1
            self.opened[key] += 1
            self.activeBy[key] += 1
            connection.lastTick = self.tick
            connection.sweptBytes = connection.bytesIn
            connection.admitted = True
            return None
        self.refused[(key[0], reason)] += 1
        return reason

    def rekey(self, connection: Connection, peer: str | None) -> str | None:
        """
        Count an admitted connection by another client from now on (the one
        its PROXY header names), or say why that client may not have one more.
        """
        old = connection.peerKey
        if peer == old:
            return None
        if self.maxPerPeer and peer is not None and self.perPeer[peer] >= self.maxPerPeer:
            self.refused[(connection.factory.serviceName, REFUSED_PER_PEER)] += 1
            return REFUSED_PER_PEER
        if old is not None:
            self.perPeer[old] -= 1
            if not self.perPeer[old]:
                del self.perPeer[old]
        if peer is not None:
            self.perPeer[peer] += 1
        connection.peerKey = peer
        return None

    #: Seconds without a refusal that end a burst of them; seconds between two
    #: summaries while one lasts.
    BURST_QUIET = 1.0
    BURST_SUMMARY = 10.0

    def recordRefusal(self, reason: str) -> bool:
        """
        Whether a refused connection gets a record of its own: the first of a
        burst does; the others are counted, and one line sums them up when a
        second passes without a refusal (every 10 s while the burst lasts).
        """
        now = self.reactor.seconds()
        self._lastRefusal = now
        if self._burst is None:
            self._summarized = now
            self._burst = self.reactor.callLater(self.BURST_QUIET, self._endBurst)
            return True
        self._unrecorded[reason] += 1
        return False

    def summarizeRefusals(self) -> None:
        """Sum up the refusals not recorded yet, now (at shutdown)."""
        if self._burst is not None and self._burst.active():
            self._burst.cancel()
        self._endBurst(final=True)

    def _endBurst(self, final: bool = False) -> None:
        now = self.reactor.seconds()
        quiet = final or now - self._lastRefusal >= self.BURST_QUIET
        if self._unrecorded and (quiet or now - self._summarized >= self.BURST_SUMMARY):
            self.log.info(
                "{count} more connections refused in {seconds:.0f} s ({reasons})",
                count=sum(self._unrecorded.values()),
                seconds=max(1.0, now - self._summarized),
                reasons=", ".join(
                    f"{n} by {reason}" for reason, n in sorted(self._unrecorded.items())
                ),
            )
            self._unrecorded.clear()
            self._summarized = now
        self._burst = None if quiet else self.reactor.callLater(self.BURST_QUIET, self._endBurst)

    def release(self, connection: Connection) -> None:
        """A connection admitted earlier has ended."""
        self.active.discard(connection)
        factory = connection.factory
        self.activeBy[(factory.serviceName, factory.transport.name)] -= 1
        self.closedBytesIn[factory.serviceName] += connection.bytesIn
        self.closedBytesOut[factory.serviceName] += connection.bytesOut
        peer = connection.peerKey
        if peer is not None:
            self.perPeer[peer] -= 1
            if not self.perPeer[peer]:
                del self.perPeer[peer]
        if self._drained is not None and not self.active:
            self._drained.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """
        Refuse new connections, let the open ones finish for up to C{timeout}
        seconds, then close the rest.  Fires when none is left.
        """
        self.draining = True
        if not self.active:
            return defer.succeed(None)
        self.log.info(
            "draining {count} connections for up to {timeout:g} s",
            count=len(self.active),
            timeout=timeout,
        )
        self._drained = defer.Deferred()
        deadline = self.reactor.callLater(timeout, self._closeAll, timeout)

        def done(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            self.stop()
            return result

        return self._drained.addBoth(done)

    def _closeAll(self, timeout: float) -> None:
        left = list(self.active)
        self.log.info(
            "closing {count} connections still open after {timeout:g} s",
            count=len(left),
            timeout=timeout,
        )
        for connection in left:
            connection.closeFor(SHUTDOWN, f"still open after the {timeout:g} s drain")

    def bytesIn(self) -> Counter[str]:
        """Bytes received by service, open connections included."""
        total = self.closedBytesIn.copy()
        for c in self.active:
            total[c.factory.serviceName] += c.bytesIn
        return total

    def bytesOut(self) -> Counter[str]:
        """Bytes sent by service, open connections included."""
        total = self.closedBytesOut.copy()
        for c in self.active:
            total[c.factory.serviceName] += c.bytesOut
        return total


class ConnectionFactory(Factory):
    """Wrap every connection of a service factory in a L{Connection}."""

    noisy = False

    def __init__(
        self,
        service: Factory[Any],
        transport: TransportInfo,
        *,
        connections: Connections | None = None,
        handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        reactor: Any = None,
        worker: int | None = None,
    ) -> None:
        self.service = service
        self.worker = worker
        self.serviceName = getattr(service, "name", "?")
        #: Whether the service's protocols say when a line is waiting to be finished (upper, ack).
        self.timesLines = callable(getattr(getattr(service, "protocol", None), "lineWaiting", None))
        self.transport = transport
        self.connections = (
            connections
            if connections is not None
            else Connections(reactor, maxConnections=0, idleTimeout=0)
        )
        self.handshakeTimeout = handshakeTimeout
        self._hosts: dict[Any, Any] = {}
        # Per listening port: its address if every connection's local address
        # is that one, else None.
        self._portHosts: dict[Any, Any] = {}

    def localAddress(self, transport: Any) -> Any:
        """
        The local address of a new connection, shared with its listening
        port's other connections: a port bound to one address (not a
        wildcard) is asked once, not each connection (a system call and an
        address object each).
        """
        # Only a TCP socket transport itself: a layer above one (PROXY) has another local address.
        if type(transport).getHost is not tcp.Server.getHost:
            return self.sharedHost(transport.getHost())
        port = transport.server
        try:
            known = self._portHosts[port]
        except KeyError:
            known = self._portHosts[port] = _fixedAddress(port)
        except TypeError:  # an unhashable stand-in
            known = None
        return known if known is not None else self.sharedHost(transport.getHost())

    _described: tuple[Any, str] = (None, "")

    def describeHost(self, address: Any) -> str:
        """C{describe(address)}, kept for the last local address asked (usually the only one)."""
        last, text = self._described
        if address is not last:
            text = describe(address)
            self._described = (address, text)
        return text

    def sharedHost(self, address: Any) -> Any:
        """
        One object for each local address: every connection keeps its own,
        and they are few (the listening port on each local IP), so they are
        shared rather than held once per connection.
        """
        shared = self._hosts.get(address)
        if shared is None:
            if len(self._hosts) >= 1024:
                self._hosts.clear()
            shared = self._hosts[address] = address
        return shared

    @property
    def reactor(self) -> Any:
        """The registry's reactor: one clock for deadlines and sweeps."""
        return self.connections.reactor

    def doStart(self) -> None:
        self.service.doStart()

    def doStop(self) -> None:
        self.service.doStop()

    def logPrefix(self) -> str:
        return self.service.logPrefix()

    def buildProtocol(self, addr: Any) -> Connection | None:
        protocol = self.service.buildProtocol(addr)
        return None if protocol is None else Connection(self, protocol)


def networkKey(address: str, prefixes: tuple[int, int] = DEFAULT_PEER_PREFIXES) -> str:
    """
    The client an address counts as for per-peer limits: C{192.0.2.7} with
    prefixes C{(24, 64)} is C{192.0.2.0/24}.  IPv4-mapped IPv6 addresses count
    as the IPv4 address; a scope (C{%eth0}) is dropped.
    """
    v4, v6 = prefixes
    if ":" not in address:
        return address if v4 == 32 else str(ipaddress.IPv4Network((address, v4), strict=False))
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return networkKey(str(ip.ipv4_mapped), prefixes)
    return str(ip) if v6 == 128 else str(ipaddress.IPv6Network((ip, v6), strict=False))


def _fixedAddress(port: Any) -> Any:
    """
    A listening port's address, if all its connections have it as their local
    address (None if unknown).
    """
    try:
        address = port.getHost()
    except Exception:
        return None
    if isinstance(address, (IPv4Address, IPv6Address)):
        # A wildcard port's connections each have the address they came to.
        return address if address.type == "TCP" and address.host not in ("0.0.0.0", "::") else None
    return None


def _noDelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on TCP: every reply is written whole, and
    holding a small one back until the previous one is acknowledged only
    adds the peer's delayed-ACK time (40 ms on Linux) to request/response
    exchanges, TLS handshakes above all.  asyncio does the same.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)  # through TLS and PROXY layers too
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass  # not TCP after all (a UNIX socket behind a wrapper), or already gone


#: Where connection records are logged (one logger, not one per connection).
_RECORDS = Logger(namespace="twistsock.connection.Connection")


@implementer(IHandshakeListener)
class Connection(Layer):
    """
    One connection of a service: admitted or refused by the limits, counted,
    closed when idle, and logged as one record when it ends (service,
    transport, addresses, bytes, duration, why it ended, and the verified
    client certificate's subject over mutual TLS).
    """

    log = Logger(namespace="twistsock.connection")

    bytesIn = 0
    bytesOut = 0
    #: The last tick in which the peer sent something (see Connections.sweep).
    lastTick = 0
    #: bytesIn as the last sweep saw it.
    sweptBytes = 0
    peerKey: str | None = None
    why: str | None = None
    detail: str | None = None
    clientSubject: str | None = None
    #: Counted by the limits (from accept on, beneath a PROXY header).
    admitted = False
    #: The tick at which the stage in progress (a PROXY header, a line) is
    #: late; None if none is timed.
    due: int | None = None
    _stage: str | None = None
    #: Whether the service was connected (and so must hear of the end).
    _serving = False
    #: Whether each line is timed (a line service, with a line deadline).
    _lines = False
    _handshaken = False
    _deadline: Any = None
    #: We aborted the connection (the service, or a deadline): TLS reports
    #: that loss as ConnectionLost, not ConnectionAborted.
    _aborted = False

    def __init__(self, factory: ConnectionFactory, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.factory = factory
        self.started = time.monotonic()

    def acceptedBeneath(self, transport: Any) -> bool:
        """
        A PROXY header reader beneath has just accepted the connection: admit
        it now, counted against C{--max-connections}, and give the header its
        deadline.  C{--max-per-peer} applies once the header names the client:
        before it, every connection comes from the load balancer.  Whether it
        was admitted (if not, it is being closed).
        """
        connections = self.factory.connections
        self.transport = transport
        self.host = self.factory.localAddress(transport)
        refused = connections.admit(self)
        if refused is not None:
            self._ended(LIMIT, refused)
            transport.abortConnection()
            return False
        if connections.proxyTicks:
            self.due, self._stage = connections.due(connections.proxyTicks), PROXY_TIMEOUT
        return True

    #: The load balancer's own connection, not a client's: it closed before any byte of a PROXY
    #: header (HAProxy's TCP check), or its header says LOCAL or UNKNOWN (a check with
    #: send-proxy).  Ended with nothing exchanged, it is a health check: counted, not logged.
    fromProxy = False

    def lostBeforeHeader(self, reason: Failure, received: int) -> None:
        """The connection ended before its PROXY header was whole (C{received} bytes of it)."""
        if self.why is None and not received:
            self.fromProxy = True
        self.bytesIn += received
        where = f"before its PROXY header ({received} bytes of it)"
        if reason is None or isinstance(reason.value, ConnectionDone):
            self._ended(PEER_CLOSED, where)
        else:
            self._ended(ERROR, f"{errorText(reason.value)}, {where}")  # a reset, as elsewhere
        self.connectionLost(reason)

    def makeConnection(self, transport: Any) -> None:
        # Both addresses now: a closed TCP transport can no longer tell its
        # own, and behind proxy: the peer is already the real client.
        factory = self.factory
        connections = factory.connections
        self.host = factory.localAddress(transport)
        if self.admitted:
            # Admitted at accept beneath a PROXY header, which named the client now.
            self.due = self._stage = None
            refused = connections.rekey(self, connections.peerKeyOf(transport))
        else:
            if connections.maxPerPeer:
                self.peerKey = connections.peerKeyOf(transport)
            refused = connections.admit(self)
        if refused is not None:
            Protocol.makeConnection(self, transport)
            self._ended(LIMIT, refused)
            transport.abortConnection()
            return
        if factory.transport.tls:
            _noDelay(transport)  # the handshake is several writes at once
            self._deadline = factory.reactor.callLater(
                factory.handshakeTimeout, self._handshakeTimedOut
            )
        self._serving = True
        if connections.lineTicks and factory.timesLines:
            self._lines = True
        Layer.makeConnection(self, transport)

    @property
    def refused(self) -> bool:
        """Whether the limits refused this connection (it is being closed, never served)."""
        return self.why == LIMIT

    def stageTimedOut(self) -> None:
        """The stage in progress (a PROXY header, a line) is past its deadline: close."""
        stage, self.due, self._stage = self._stage, None, None
        connections = self.factory.connections
        if stage == PROXY_TIMEOUT:
            self.closeFor(PROXY_TIMEOUT, f"no PROXY header within {connections.proxyTimeout:g} s")
        else:
            self.closeFor(LINE_TIMEOUT, f"no complete line within {connections.lineTimeout:g} s")

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        # Only TLS connections are told of a handshake.  ISSLTransport says
        # getPeerCertificate returns an object: pyOpenSSL's X509, or None.
        transport = cast(ISSLTransport, self.transport)
        certificate = cast("X509 | None", transport.getPeerCertificate())
        if certificate is not None:
            # A subject may hold any character, newlines included: one line, escaped.
            self.clientSubject = oneLine(certificate.to_cryptography().subject.rfc4514_string())
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()

    def _handshakeTimedOut(self) -> None:
        self._deadline = None
        self.closeFor(HANDSHAKE_TIMEOUT, f"no handshake within {self.factory.handshakeTimeout:g} s")

    def closeFor(self, why: str, detail: str) -> None:
        """Close now, for the given reason (idle, shutdown, a deadline)."""
        self._ended(why, detail)
        self.abortConnection()  # the reason given stands

    def _ended(self, why: str, detail: str | None = None) -> None:
        """Say why the connection ends; the first reason given stands."""
        if self.why is None:
            self.why, self.detail = why, detail

    # -- counting and reasons --

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)  # which is what the idle sweep looks at
        if not self._lines:
            self.wrapped.dataReceived(data)
            return
        connections = self.factory.connections
        # A line is timed from its first byte: a new one starts when none was
        # waiting, or when this read completed one and left the start of another.
        service: Any = self.wrapped  # a LineService: factory.timesLines said so
        before = service.lines
        service.dataReceived(data)
        if not service.lineWaiting():
            self.due = self._stage = None
        elif self.due is None or service.lines != before:
            self.due, self._stage = connections.due(connections.lineTicks), LINE_TIMEOUT

    #: Whether Nagle's algorithm is still on: until a second write, it
    #: delays nothing (a first write has nothing unacknowledged before it),
    #: so a one-reply connection (upper, ack) saves the system call.
    _nagle = True

    def write(self, data: bytes) -> None:
        if self._nagle and self.bytesOut:
            self._nagle = False
            _noDelay(self.transport)
        self.bytesOut += len(data)
        if self._direct:
            writeDirectly(self.transport, data, self)
        else:
            self.transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        if self._nagle and self.bytesOut:
            self._nagle = False
            _noDelay(self.transport)
        self.bytesOut += sum(map(len, data))
        Layer.writeSequence(self, data)

    def readConnectionLost(self) -> None:
        self._ended(PEER_CLOSED)
        super().readConnectionLost()

    def loseConnection(self) -> None:
        if self.why is None:
            self.why = SERVICE_CLOSED
        if self._direct:
            loseDirectly(self.transport)
        else:
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._ended(SERVICE_CLOSED)
        self._aborted = True
        self.transport.abortConnection()

    def closeWriting(self) -> bool:
        if not Layer.closeWriting(self):
            return False
        self._ended(SERVICE_CLOSED)
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        # isinstance, not Failure.check: check walks the class's bases by name.
        clean = reason is None or isinstance(reason.value, ConnectionDone)
        if self.factory.transport.tls and not self._handshaken and self.admitted:
            self._ended(
                HANDSHAKE_FAILED, "closed by the peer" if clean else errorText(reason.value)
            )
        elif self.why is not None:
            if (
                self.why == SERVICE_CLOSED
                and not clean
                and not self._aborted
                and not isinstance(reason.value, ConnectionAborted)
            ):
                # The service closed, but the connection then failed (a reset before
                # its reply was sent): what the client saw was the error.
                self.why, self.detail = ERROR, errorText(reason.value)
        elif clean:
            self.why = PEER_CLOSED
        else:
            self._ended(ERROR, errorText(reason.value))
        if self.why in (HANDSHAKE_FAILED, HANDSHAKE_TIMEOUT):
            self.factory.connections.handshakeFailures[self.factory.serviceName] += 1
        try:
            if self._serving:
                # The service's own last words (sink's "Ending connection") before the record.
                self._serving = False
                self.wrapped.connectionLost(reason)
        finally:
            self._record()
            if self.admitted:
                self.admitted = False
                self.factory.connections.release(self)

    def _record(self) -> None:
        # The text is built here and logged as one field: Twisted's formatter
        # (string.Formatter, field by field) cost more than the connection
        # itself.  Every part is still a field of its own for JSON logs.
        factory = self.factory
        if (
            self.fromProxy
            and self.why in (PEER_CLOSED, ERROR)
            and not self.bytesIn
            and not self.bytesOut
        ):
            return
        if self.why in _SUMMARIZED and not factory.connections.recordRefusal(
            (self.detail or LIMIT) if self.why == LIMIT else self.why
        ):
            return
        extra = f" ({self.detail})" if self.detail else ""
        if self.clientSubject:
            extra += f", client certificate {self.clientSubject}"
        if factory.worker is not None:
            extra += f", worker {factory.worker}"
        local, peer = factory.describeHost(self.host), describe(self.transport.getPeer())
        duration = time.monotonic() - self.started
        logs.record(
            _RECORDS,
            record=(
                f"{factory.serviceName} {factory.transport.name} {peer} -> {local}: "
                f"{self.why} after {duration:.3f} s, "
                f"{self.bytesIn} bytes in, {self.bytesOut} bytes out{extra}"
            ),
            service=factory.serviceName,
            transport=factory.transport.name,
            local=local,
            peer=peer,
            reason=self.why,
            detail=self.detail,
            duration=duration,
            bytes_in=self.bytesIn,
            bytes_out=self.bytesOut,
            tls_client_subject=self.clientSubject,
            worker=factory.worker,
        )
