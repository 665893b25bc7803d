"""
What twistsock adds around every stream service, beside it rather than inside
it: one record per connection when it ends, and for TLS a handshake deadline
and the verified client certificate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._format import describe, errorText
from ._layer import Layer

#: Seconds a TLS client has to finish its handshake, unless told otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# Why a connection ended, as the record says it.
PEER_CLOSED = "peer closed"
SERVICE_CLOSED = "service closed"
ERROR = "error"
HANDSHAKE_FAILED = "tls handshake failed"
HANDSHAKE_TIMEOUT = "tls handshake timeout"


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
    """Split C{proxy:ssl:443:...} into its PROXY wrappers, the inner type, and that type's arguments."""
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


class ConnectionFactory(Factory):
    """Wrap every connection of a service factory in a L{Connection}."""

    noisy = False

    def __init__(
        self,
        service: IProtocolFactory,
        transport: TransportInfo,
        *,
        handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        self.service = service
        self.transport = transport
        self.handshakeTimeout = handshakeTimeout
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def doStart(self) -> None:
        self.service.doStart()

    def doStop(self) -> None:
        self.service.doStop()

    def logPrefix(self) -> str:
        return self.service.logPrefix()

    def buildProtocol(self, addr: Any) -> Connection | None:
        protocol = self.service.buildProtocol(addr)
        return None if protocol is None else Connection(self, protocol)


@implementer(IHandshakeListener)
class Connection(Layer):
    """
    One connection of a service: counts its bytes, and logs one record when
    it ends (service, transport, addresses, bytes, duration, why it ended,
    and the verified client certificate's subject over mutual TLS).
    """

    log = Logger(namespace="twistsock.connection")

    bytesIn = 0
    bytesOut = 0
    why: str | None = None
    detail: str | None = None
    clientSubject: str | None = None
    _handshaken = False
    _deadline: Any = None

    def __init__(self, factory: ConnectionFactory, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.factory = factory
        self.started = time.monotonic()

    def makeConnection(self, transport: Any) -> None:
        if self.factory.transport.tls:
            self._deadline = self.factory.reactor.callLater(self.factory.handshakeTimeout, self._handshakeTimedOut)
        # A closed TCP transport can no longer tell its own address.
        self.host = transport.getHost()
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            self.clientSubject = certificate.to_cryptography().subject.rfc4514_string()
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()

    def _handshakeTimedOut(self) -> None:
        self._deadline = None
        self._ended(HANDSHAKE_TIMEOUT, f"no handshake within {self.factory.handshakeTimeout:g} s")
        self.transport.abortConnection()

    def _ended(self, why: str, detail: str | None = None) -> None:
        """Say why the connection ends; the first reason given stands."""
        if self.why is None:
            self.why, self.detail = why, detail

    # -- counting and reasons --

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.wrapped.dataReceived(data)

    def write(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.bytesOut += sum(map(len, data))
        self.transport.writeSequence(data)

    def readConnectionLost(self) -> None:
        self._ended(PEER_CLOSED)
        super().readConnectionLost()

    def loseConnection(self) -> None:
        self._ended(SERVICE_CLOSED)
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._ended(SERVICE_CLOSED)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.factory.transport.tls and not self._handshaken:
            self._ended(HANDSHAKE_FAILED, errorText(reason.value) if reason is not None and not reason.check(ConnectionDone) else "closed by the peer")
        elif reason is None or reason.check(ConnectionDone):
            self._ended(PEER_CLOSED)
        else:
            self._ended(ERROR, errorText(reason.value))
        self._record()
        super().connectionLost(reason)

    def _record(self) -> None:
        extra = f" ({self.detail})" if self.detail else ""
        if self.clientSubject:
            extra += f", client certificate {self.clientSubject}"
        self.log.info(
            "{service} {transport} {peer} -> {local}: {reason} after {duration:.3f} s, {bytes_in} bytes in, {bytes_out} bytes out{extra}",
            service=getattr(self.factory.service, "name", "?"),
            transport=self.factory.transport.name,
            local=describe(self.host),
            peer=describe(self.getPeer()),
            reason=self.why,
            detail=self.detail,
            duration=time.monotonic() - self.started,
            bytes_in=self.bytesIn,
            bytes_out=self.bytesOut,
            tls_client_subject=self.clientSubject,
            extra=extra,
        )
