"""
The PROXY protocol (v1 and v2) in front of any stream endpoint: C{proxy:ENDPOINT}.

The header is read on the socket itself, before anything the wrapped endpoint
adds above it, so C{proxy:ssl:...} and C{proxy:mtls:...} take the header
before the TLS handshake: the order HAProxy's C{send-proxy} uses in TCP mode.
(Twisted's C{haproxy:ssl:...} expects it inside TLS.)

Unlike Twisted's C{haproxy:} wrapper, a header may arrive in pieces of any
size (Twisted's refuses a first piece shorter than 8 or 16 bytes), and the
protocol behind starts only once the header is read, so its C{connectionMade}
already sees the real client.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorUNIX,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ._direct import canWriteDirectly
from ._format import describe, host, printable
from ._layer import Layer
from .connection import DEFAULT_PROXY_TIMEOUT, PROXY_INVALID
from .endpoints import serverFromString

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 header, "\r\n" included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class InvalidHeader(ValueError):
    """The bytes are not a PROXY protocol header."""


def parseHeader(data: bytes) -> tuple[int, object | None, object | None] | None:
    """
    Parse a PROXY header at the start of C{data}.

    @return: C{None} if more bytes are needed; else the header's length and
        the source and destination addresses it gives (both C{None} for a
        C{LOCAL} or C{UNKNOWN} connection: use the connection's own).
    @raise InvalidHeader: not a header.
    """
    if data[:1] == b"P":
        return _parseV1(data)
    if data[:1] == b"\r":
        return _parseV2(data)
    if data:
        raise InvalidHeader("no PROXY signature")
    return None


def _parseV1(data: bytes):
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise InvalidHeader("no PROXY signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise InvalidHeader(f"v1 header longer than {V1_MAX} bytes")
        return None
    fields = data[:end].split(b" ")
    if fields[:2] == [b"PROXY", b"UNKNOWN"]:
        return end + 2, None, None
    if len(fields) != 6 or fields[0] != b"PROXY" or fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidHeader("malformed v1 header")
    try:
        version = 4 if fields[1] == b"TCP4" else 6
        hosts = [ipaddress.ip_address(f.decode("ascii")) for f in fields[2:4]]
        ports = [int(f) for f in fields[4:6]]
    except ValueError:
        raise InvalidHeader("malformed v1 address") from None
    if any(h.version != version for h in hosts) or any(
        not f.isdigit() or p > 65535 for p, f in zip(ports, fields[4:6], strict=True)
    ):
        raise InvalidHeader("malformed v1 address")
    return end + 2, _address(hosts[0], ports[0]), _address(hosts[1], ports[1])


def _address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> IPv4Address | IPv6Address:
    """
    One client, one address: an IPv4-mapped IPv6 address is the IPv4 address
    it maps, and a scope (C{fe80::1%eth0}, which no v2 header can carry) is
    dropped, so the same client keys and logs alike from v1 and v2 headers.
    """
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return IPv4Address("TCP", str(mapped), port)
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.packed)
        return IPv6Address("TCP", str(ip), port)
    return IPv4Address("TCP", str(ip), port)


def _parseV2(data: bytes):
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise InvalidHeader("no PROXY signature")
    if len(data) < 16:
        return None
    versionCommand, family, length = struct.unpack("!BBH", data[12:16])
    if versionCommand >> 4 != 2 or versionCommand & 0x0F not in (0, 1):
        raise InvalidHeader("unsupported v2 version or command")
    total = 16 + length
    if len(data) < total:
        return None
    if versionCommand & 0x0F == 0 or family >> 4 == 0:  # LOCAL, or UNSPEC
        return total, None, None
    body = data[16:total]
    addressFamily, transport = family >> 4, family & 0x0F
    if transport not in (1, 2):
        raise InvalidHeader("unsupported v2 transport")
    if addressFamily == 1 and length >= 12:
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return (
            total,
            IPv4Address("TCP", socket.inet_ntop(socket.AF_INET, src), sport),
            IPv4Address("TCP", socket.inet_ntop(socket.AF_INET, dst), dport),
        )
    if addressFamily == 2 and length >= 36:
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return (
            total,
            _address(ipaddress.IPv6Address(src), sport),
            _address(ipaddress.IPv6Address(dst), dport),
        )
    if addressFamily == 3 and length >= 216:
        return (
            total,
            UNIXAddress(body[:108].split(b"\0", 1)[0] or None),
            UNIXAddress(body[108:216].split(b"\0", 1)[0] or None),
        )
    raise InvalidHeader("malformed v2 address block")


class ProxyHeaderProtocol(Layer):
    """
    Read a PROXY header, then connect the wrapped protocol with the addresses
    the header gives and pass everything through.  A connection without a
    valid header is logged once and closed.

    Beneath twistsock's connection layer (L{twistsock.connection.Connection},
    possibly with TLS between), that layer takes the connection in at accept:
    it counts against the limits, its header has a deadline, and its record
    says how it ended.  Alone (the C{proxy:} plugin in another program), the
    header's deadline is a timer of its own.
    """

    log = Logger()
    _peer: object | None = None
    _host: object | None = None
    _passing = False
    #: twistsock's connection layer above, which took the connection in at accept.
    _above: Any = None
    _timer: Any = None

    def __init__(self, wrapped: IProtocol) -> None:
        super().__init__(wrapped)
        self._buffer = b""

    def makeConnection(self, transport: Any) -> None:
        # The protocol above starts once the header says who the client is.
        self._direct = canWriteDirectly(transport)
        Protocol.makeConnection(self, transport)
        above = _connectionAbove(self.wrapped)
        if above is not None:
            self._above = above
            above.acceptedBeneath(transport)
        elif self.factory is not None and self.factory.timeout > 0:
            self._timer = (
                transport.reactor.callLater(self.factory.timeout, self._timedOut)
                if hasattr(transport, "reactor")
                else None
            )

    def _timedOut(self) -> None:
        self._timer = None
        self.log.info(
            "{peer} closed: no PROXY header within {timeout:g} s ({count} bytes of it)",
            peer=describe(self.transport.getPeer()),
            timeout=self.factory.timeout,
            count=len(self._buffer),
        )
        self._buffer = b""
        self.transport.abortConnection()

    #: The header came from the proxy's own connection, and the protocol above
    #: starts with the first byte after it (see L{dataReceived}).
    _starting = False

    def dataReceived(self, data: bytes) -> None:
        if self._passing:
            if self._starting:
                self._starting = False
                self.wrapped.makeConnection(cast(ITransport, self))
                if self._refusedAbove():
                    return
            self.wrapped.dataReceived(data)
            return
        self._buffer += data
        try:
            parsed = parseHeader(self._buffer)
        except InvalidHeader as e:
            self._refuse(str(e))
            return
        if parsed is None:
            return
        length, self._peer, self._host = parsed
        rest, self._buffer = self._buffer[length:], b""
        self._passing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._above is not None and (
            self._peer is None or _sameEnd(self._peer, self.transport.getPeer())
        ):
            # LOCAL (v2) or UNKNOWN (v1), or a header that names the proxy's own
            # end of this connection as the client (HAProxy's checks with
            # send-proxy): the proxy's own connection, e.g. a health check.  The
            # protocol above starts with its first byte: a check that connects
            # and closes starts nothing, so is neither logged nor answered.
            self._above.fromProxy = True
            if not rest:
                self._starting = True
                return
        self.wrapped.makeConnection(cast(ITransport, self))  # as in Layer.makeConnection
        if rest and not self._refusedAbove():
            self.wrapped.dataReceived(rest)

    def _refusedAbove(self) -> bool:
        """
        Whether the connection layer above refused the client the header
        named (C{--max-per-peer}): it is being closed, and the bytes that
        came with the header must not reach a service that never started.
        """
        return self._above is not None and self._above.refused

    def _refuse(self, why: str) -> None:
        start = printable(self._buffer[:32])
        if self._above is not None:
            self._above._ended(
                PROXY_INVALID, f"{why}, first bytes: {start}"
            )  # said in its record, with the bytes counted
        else:
            self.log.info(
                "{peer} refused: {why} (first bytes: {start})",
                peer=describe(self.transport.getPeer()),
                why=why,
                start=start,
            )
            self._buffer = b""
        self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self._passing and not self._starting:
            super().readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._passing and not self._starting:
            super().writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._passing and self._starting:
            self._above.lostBeforeHeader(reason, 0)  # ended before its first byte: nothing started
        elif self._passing:
            self.wrapped.connectionLost(reason)
        elif self._above is not None:
            received, self._buffer = len(self._buffer), b""
            self._above.lostBeforeHeader(reason, received)
        elif self._buffer:
            self.log.info(
                "{peer} closed before its PROXY header was complete ({count} bytes)",
                peer=describe(self.transport.getPeer()),
                count=len(self._buffer),
            )

    def getPeer(self) -> object:
        return self._peer if self._peer is not None else self.transport.getPeer()

    def getHost(self) -> object:
        return self._host if self._host is not None else self.transport.getHost()


def _sameEnd(named: object, peer: object) -> bool:
    """Whether a PROXY header's client is the very end of the connection it came on."""
    return (
        isinstance(named, (IPv4Address, IPv6Address))
        and isinstance(peer, (IPv4Address, IPv6Address))
        and named.port == peer.port
        and host(named.host) == host(peer.host)
    )


def _connectionAbove(protocol: Any) -> Any:
    """
    twistsock's connection layer in the stack above a header reader (through
    TLS), if there is one.
    """
    for _ in range(4):
        if protocol is None or callable(getattr(type(protocol), "acceptedBeneath", None)):
            return protocol
        protocol = protocol.__dict__.get("wrappedProtocol")  # TLS; never a transport's attribute
    return None


class ProxyHeaderFactory(Factory):
    """Wrap each protocol of C{wrappedFactory} in a L{ProxyHeaderProtocol}."""

    noisy = False

    def __init__(
        self, wrappedFactory: IProtocolFactory, timeout: float = DEFAULT_PROXY_TIMEOUT
    ) -> None:
        self.wrappedFactory = wrappedFactory  # the name Twisted's WrappingFactory uses
        #: Seconds a client has to send its header (when no connection layer above times it).
        self.timeout = timeout

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        return f"{inner() if inner else type(self.wrappedFactory).__name__} (PROXY)"

    def buildProtocol(self, addr: Any) -> ProxyHeaderProtocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        protocol = ProxyHeaderProtocol(inner)
        protocol.factory = self
        return protocol


@implementer(IReactorTCP, IReactorSSL, IReactorUNIX, IReactorSocket)
class _ProxyHeaderReactor:
    """
    A reactor that puts a PROXY header reader first on every socket it
    listens on, beneath anything (TLS) the endpoint adds above it.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._reactor.listenTCP(port, ProxyHeaderFactory(factory), backlog, interface)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        return self._reactor.listenTCP(port, ProxyHeaderFactory(tls), backlog, interface)

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        return self._reactor.listenUNIX(
            address, ProxyHeaderFactory(factory), backlog, mode, wantPID
        )

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        return self._reactor.adoptStreamPort(
            fileDescriptor, addressFamily, ProxyHeaderFactory(factory)
        )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ProxyServerParser:
    """C{proxy:ENDPOINT}: a PROXY header first, then ENDPOINT (which may add TLS)."""

    prefix = "proxy"

    # The pieces are strings; Any, as in Twisted's own tls: parser, because
    # the interface types them as objects.
    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        if not args:
            raise ValueError("proxy: needs an endpoint to wrap, as in proxy:tcp:5000")
        return serverFromString(_ProxyHeaderReactor(reactor), _unparse(args, kwargs))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _unparse(args: tuple[str, ...], kwargs: dict[str, str]) -> str:
    """Rebuild the wrapped endpoint string from the pieces Twisted's parser split."""
    return ":".join(
        [*(_escape(a) for a in args), *(f"{_escape(k)}={_escape(v)}" for k, v in kwargs.items())]
    )
