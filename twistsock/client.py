"""
The twistsock clients, for scripts: one function per service, each returning a
L{Deferred<twisted.internet.defer.Deferred>}::

    from twisted.internet import task
    from twistsock import client

    def main(reactor):
        d = client.echo("tcp:127.0.0.1:5000", b"hello", reactor=reactor)
        return d.addCallback(print)

    task.react(main)

A target is a Twisted client endpoint string (C{tcp:127.0.0.1:5000},
C{unix:path=/tmp/echo.sock}, C{tls:localhost:3443}, C{tls:[::1]:3443}), a
C{(host, port)} pair (host names, IPv4 and IPv6 literals such as C{::1}), or
an L{IStreamClientEndpoint}.  C{tls:} targets verify the server's certificate
and name: C{ca} names a file of trusted CA certificates (default: the
platform's), C{cert} a file with a client key and certificate.  Every
operation is bounded by C{timeout} seconds, connecting included.  Failures
are L{ClientError} subclasses whose C{exitStatus} the C{twistsock} command
exits with; a malformed target raises C{ValueError} at once.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any, Literal, Union, cast, overload

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet import udp as _udp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    IResolutionReceiver,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from . import tls
from ._format import describe, errorText, oneLine, printable, splitHostTarget
from ._types import IStreamTransport
from .certs import hostName

if TYPE_CHECKING:
    # What twisted.internet.stdio.StandardIO is on POSIX; the type checker
    # sees the Windows one (stdio chooses with platform.isWindows()).
    from twisted.internet._posixstdio import StandardIO as _StandardIO

__all__ = [
    "Target",
    "ClientError",
    "UnknownHost",
    "ConnectionRefused",
    "Timeout",
    "EchoMismatch",
    "CertificateError",
    "TLSFailed",
    "ServerError",
    "ConnectionFailed",
    "DEFAULT_TIMEOUT",
    "endpoint",
    "send",
    "echo",
    "upper",
    "ack",
    "udp",
    "relay",
    "RelayResult",
    "RELAY_MODES",
    "DEFAULT_RETRIES",
]

Target = Union[str, "tuple[str, int]", IStreamClientEndpoint]

#: Seconds an operation may take, connecting included, unless told otherwise.
DEFAULT_TIMEOUT = 10.0

#: The longest reply C{ack} reads; the tutorial's server.c sends 18 bytes.
MAX_ACK_REPLY = 64 * 1024


class ClientError(Exception):
    """An operation failed; the message is one line for the user."""

    #: The status the C{twistsock} command exits with.
    exitStatus = 1


class ConnectionFailed(ClientError):
    """The connection could not be made or broke off."""

    exitStatus = 1


class UnknownHost(ClientError):
    """The host name does not resolve (streamwrite exits 2 here too)."""

    exitStatus = 2


class ConnectionRefused(ClientError):
    """Nothing listens at the target."""

    exitStatus = 3


class Timeout(ClientError):
    """The operation did not finish within its timeout."""

    exitStatus = 4


class EchoMismatch(ClientError):
    """What came back differs from what was sent, or stopped short of it."""

    exitStatus = 5


class CertificateError(ClientError):
    """The server's certificate is not signed by a trusted CA, or not for this host."""

    exitStatus = 6


class TLSFailed(ClientError):
    """
    The TLS handshake failed otherwise: e.g. the server refused our certificate
    or TLS version.
    """

    exitStatus = 7


class ServerError(ClientError):
    """
    The server answered with an error (C{error: line longer than 65536 bytes});
    C{reply} holds its line.
    """

    exitStatus = 8

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


def _check(data: object, name: str, timeout: float) -> bytes:
    """Misuse fails at once, with the type or value that is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"{name} must be bytes, not {type(data).__name__} (encode text first: {name}.encode())"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be more than 0 seconds, not {timeout!r}")
    return bytes(data)  # a bytearray or memoryview is sent as the bytes it holds now


def send(
    target: Target,
    data: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    family: int = 0,
    reactor: IReactorTime | None = None,
) -> defer.Deferred[None]:
    """
    Send C{data}, then close (streamwrite).  Fires with C{None}
    once every byte is handed to the peer's kernel and the connection closed.
    """
    data = _check(data, "data", timeout)
    return _exchange(target, _Send(data), timeout, ca, cert, reactor, family)


def echo(
    target: Target,
    data: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    family: int = 0,
    reactor: IReactorTime | None = None,
) -> defer.Deferred[bytes]:
    """
    Send C{data} and read until all of it is back (the classic TCP echo client).  Fires
    with the echoed bytes; fails with L{EchoMismatch} at the first byte that
    differs, on extra bytes, or if the server closes before all came back.
    """
    data = _check(data, "data", timeout)
    return _exchange(target, _Echo(data), timeout, ca, cert, reactor, family)


def upper(
    target: Target,
    line: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    family: int = 0,
    reactor: IReactorTime | None = None,
) -> defer.Deferred[bytes]:
    """
    Send one line and fire with the server's reply line, without its ending
    (the Java TCPClient).  A reply that is the server's error (C{error: ...})
    fails with L{ServerError}.
    """
    line = _check(line, "line", timeout)
    if b"\n" in line:
        raise ValueError("upper sends one line: the line must not contain a newline")
    return _exchange(target, _Line(line), timeout, ca, cert, reactor, family)


def ack(
    target: Target,
    message: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    family: int = 0,
    reactor: IReactorTime | None = None,
) -> defer.Deferred[bytes]:
    """
    Send one message (a line) and fire with the server's reply, read until it
    closes (the sockets tutorial's client.c).  A reply that is the server's error
    (C{error: ...}) fails with L{ServerError}.
    """
    message = _check(message, "message", timeout)
    if b"\n" in message.rstrip(b"\n"):
        raise ValueError("ack sends one message: the message must not contain a newline")
    return _exchange(
        target,
        _UntilClose(message.rstrip(b"\n") + b"\n", MAX_ACK_REPLY),
        timeout,
        ca,
        cert,
        reactor,
        family,
    )


_PENDING = object()


#: How many times udp() sends again when no reply has come, unless told otherwise.
DEFAULT_RETRIES = 2
#: The largest datagram udp() sends to an IPv4 address (65535 less the IPv4 and UDP headers).
MAX_DATAGRAM = 65507
#: The largest datagram to an IPv6 address (65535 less the UDP header; no jumbograms).
MAX_DATAGRAM6 = 65527


@overload
def udp(
    target: str | tuple[str, int],
    data: bytes,
    *,
    timeout: float = ...,
    retries: int = ...,
    reply: Literal[True] = ...,
    family: int = ...,
    reactor: Any = ...,
) -> defer.Deferred[bytes]: ...


@overload
def udp(
    target: str | tuple[str, int],
    data: bytes,
    *,
    timeout: float = ...,
    retries: int = ...,
    reply: Literal[False],
    family: int = ...,
    reactor: Any = ...,
) -> defer.Deferred[None]: ...


@overload
def udp(
    target: str | tuple[str, int],
    data: bytes,
    *,
    timeout: float = ...,
    retries: int = ...,
    reply: bool,
    family: int = ...,
    reactor: Any = ...,
) -> defer.Deferred[bytes | None]: ...


def udp(
    target: str | tuple[str, int],
    data: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    reply: bool = True,
    family: int = 0,
    reactor: Any = None,
) -> defer.Deferred[Any]:  # the overloads above say which
    """
    Send one datagram and fire with the first reply (the classic UDP client).
    The datagram is sent again C{retries} times, evenly within C{timeout}, if
    no reply has come.  The socket is connected, so only the target can answer.
    C{target} is C{udp:HOST:PORT} (C{udp:[::1]:5000}) or C{(host, port)}.
    With C{reply=False} (for C{sink}, which never answers) the datagram is sent
    once and the result is C{None} as soon as it is sent.  A timeout says why
    a server may stay silent.  UDP has no TLS: C{udp} takes no C{ca} or C{cert}.
    """
    data = _check(data, "data", timeout)
    if reactor is None:
        from twisted.internet import reactor
    host, port = udpTarget(target)
    if (family == socket.AF_INET6 and isIPAddress(host)) or (
        family == socket.AF_INET and isIPv6Address(host)
    ):
        raise ValueError(
            f"{host} is an IPv{4 if isIPAddress(host) else 6} address, and "
            f"IPv{6 if family == socket.AF_INET6 else 4} only was asked for"
        )
    limit = (
        MAX_DATAGRAM6
        if isIPv6Address(host)
        else MAX_DATAGRAM
        if isIPAddress(host)
        else MAX_DATAGRAM6
    )
    if len(data) > limit:
        raise ValueError(f"a datagram to {host} holds at most {limit} bytes, not {len(data)}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number, 0 or more, not {retries!r}")
    where = _describe(target)
    if not reply:
        retries = 0
    exchange = _DatagramExchange(reactor, bytes(data), timeout / (retries + 1), retries + 1, reply)
    exchange.peerPort = port
    d = _resolve(reactor, host, port, family).addCallback(exchange.start)
    d.addTimeout(timeout, reactor)
    d.addBoth(exchange.stop)
    return d.addErrback(_translate, where, timeout).addErrback(_silentServer)


def _silentServer(reason: Failure) -> Failure:
    """A UDP timeout: say why a server may not answer."""
    if reason.check(Timeout):
        raise Timeout(
            f"{reason.value}: no reply (sink never answers: send without waiting for one; "
            "twistsock's servers send no reply larger than its request, so ack answers only "
            "datagrams of 18 bytes or more; a rate limit drops replies too)"
        )
    return reason


def udpTarget(target: str | tuple[str, int]) -> tuple[str, int]:
    """
    The host and port of a UDP target.

    @raise ValueError: neither C{udp:HOST:PORT} nor C{(host, port)}.
    """
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"a (host, port) target has two parts, not {len(target)}")
        host, port = target
        port = _port(port)
        if host.startswith("[") and host.endswith("]"):  # [::1], as in URLs
            host = host[1:-1]
        return host, port
    if not isinstance(target, str):
        raise TypeError(
            f"a UDP target is udp:HOST:PORT or a (host, port) pair, not {type(target).__name__}"
        )
    if not target.startswith("udp:"):
        raise ValueError(f"bad target {target!r}: a UDP target is udp:HOST:PORT or HOST PORT")
    _, host, port, options = splitHostTarget(target)
    if options:
        raise ValueError(f"bad target {target!r}: unknown option {', '.join(sorted(options))}")
    return host, port


def _resolve(reactor: Any, host: str, port: int, family: int = 0) -> defer.Deferred[str]:
    """The first address of C{host} (IPv4 or IPv6); an address literal is itself."""
    if isIPAddress(host) or isIPv6Address(host):
        return defer.succeed(host)
    found: list[str] = []
    done: defer.Deferred[str] = defer.Deferred()

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution: object) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            found.append(address.host)

        def resolutionComplete(self) -> None:
            if found:
                done.callback(found[0])
            else:
                done.errback(error.DNSLookupError(host))

    from twisted.internet.address import IPv4Address, IPv6Address

    byFamily: dict[int, list[type]] = {
        socket.AF_INET: [IPv4Address],
        socket.AF_INET6: [IPv6Address],
    }
    types = byFamily.get(family)
    reactor.nameResolver.resolveHostName(
        Receiver(), host, port, addressTypes=types, transportSemantics="UDP"
    )
    return done


class _DatagramExchange(DatagramProtocol):
    """Send a datagram every C{interval} seconds, C{attempts} times, until a reply comes."""

    #: A connected UDP port: Twisted's udp.Port, whose write needs no address.
    transport: _udp.Port | None
    #: The port to send to; set by L{udp} before L{start}.
    peerPort: int

    def __init__(
        self, reactor: Any, data: bytes, interval: float, attempts: int, reply: bool = True
    ) -> None:
        self.reactor = reactor
        self.reply = reply
        self.data = data
        self.interval = interval
        self.attempts = attempts
        self.port: Any = None
        self._resend: Any = None
        self.done: defer.Deferred[bytes | None] = defer.Deferred()

    def start(self, address: str) -> defer.Deferred[bytes | None]:
        if ":" not in address and len(self.data) > MAX_DATAGRAM:  # a name that resolved to IPv4
            raise ValueError(
                f"a datagram to an IPv4 address ({address}) holds at most {MAX_DATAGRAM} "
                f"bytes, not {len(self.data)}"
            )
        interface = "::" if ":" in address else "0.0.0.0"
        self.port = self.reactor.listenUDP(
            0, self, interface=interface, maxPacketSize=MAX_DATAGRAM + 1024
        )
        assert self.transport is not None  # listenUDP made the connection
        self.transport.connect(address, self.peerPort)
        log.debug(
            "sending to {peer} from {host}",
            peer=describe(
                (IPv6Address if ":" in address else IPv4Address)("UDP", address, self.peerPort)
            ),
            host=describe(self.transport.getHost()),
        )
        self._send()
        return self.done

    def _send(self) -> None:
        self._resend = None
        if self.attempts > 0 and not self.done.called and self.transport is not None:
            self.attempts -= 1
            self.transport.write(self.data)
            if not self.reply:
                self.done.callback(None)
                return
            if self.attempts:
                self._resend = self.reactor.callLater(self.interval, self._send)

    def datagramReceived(self, data: bytes, address: object) -> None:
        if not self.done.called:
            self.done.callback(data)

    def connectionRefused(self) -> None:
        # An ICMP port unreachable: nothing listens there.
        if not self.done.called:
            self.done.errback(error.ConnectionRefusedError())

    def doStop(self) -> None:
        # The epoll reactor takes the ICMP error on a connected UDP socket
        # (EPOLLERR without EPOLLIN) for a disconnect and drops the port
        # without calling connectionRefused: the socket, still open here,
        # says why.
        if not self.done.called and self.transport is not None:
            code = self.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == errno.ECONNREFUSED:
                self.done.errback(error.ConnectionRefusedError())
            else:
                self.done.errback(
                    error.ConnectError(code, os.strerror(code) if code else "the socket was closed")
                )

    def stop(self, result: object) -> object:
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        if self.port is not None:
            self.port.stopListening()
        return result


#: Where the client says what it does, at debug level (C{twistsock --verbose} shows it).
log = Logger(namespace="twistsock.client")


class _Reporting(Protocol):
    """
    Say, at debug level, where a connection goes and what TLS it got; close
    a TLS connection only once its handshake is done.
    """

    transport: IStreamTransport

    _handshaken = False
    _closeAfterHandshake = False

    def endInput(self) -> bool:
        """
        Say we will send nothing more: over TLS, close_notify (twistsock's
        servers take it as a half-close), sent once the handshake is done (with
        nothing written before it, Twisted would close the TCP connection at
        once, before the server had even a ClientHello); else a half-close, or
        a close where the transport has none.  Whether it was a close (then
        the data is all out once the server answers).
        """
        if ISSLTransport.providedBy(self.transport):
            if self._handshaken:
                self.transport.loseConnection()
            else:
                self._closeAfterHandshake = True
            return True
        halfClose = getattr(self.transport, "loseWriteConnection", None)
        if halfClose is None:
            self.transport.loseConnection()
            return True
        halfClose()
        return False

    def makeConnection(self, transport: Any) -> None:
        _declareThrough(transport, self)
        log.debug(
            "connected to {peer} from {host}",
            peer=describe(transport.getPeer()),
            host=describe(transport.getHost()),
        )
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        if self._closeAfterHandshake:
            self._closeAfterHandshake = False
            self.transport.loseConnection()
        # A TLS transport's handle is its pyOpenSSL connection (ISystemHandle says object).
        handle = cast(SSL.Connection, self.transport.getHandle())
        certificate = (
            handle.get_peer_certificate(as_cryptography=True)
            if hasattr(handle, "get_peer_certificate")
            else None
        )
        log.debug(
            "TLS: {version}, {cipher}, group {group}; server certificate {subject}, issued by "
            "{issuer}",
            version=handle.get_protocol_version_name(),
            cipher=handle.get_cipher_name(),
            group=_group(handle),
            subject=oneLine(certificate.subject.rfc4514_string())
            if certificate is not None
            else "(none)",
            issuer=oneLine(certificate.issuer.rfc4514_string())
            if certificate is not None
            else "(none)",
        )


def _declareThrough(transport: Any, protocol: Any) -> None:
    """
    Make the endpoint's wrapper around C{protocol} say every interface the
    protocol has.  Twisted's C{_WrappingProtocol} copies them with
    C{directlyProvides} in a loop, so only the last one stays: a protocol
    that is both L{IHalfCloseableProtocol} and L{IHandshakeListener} loses
    its half-close (C{writeConnectionLost} is never called).
    """
    for wrapper in (
        getattr(transport, "protocol", None),
        getattr(transport, "wrappedProtocol", None),
    ):
        if getattr(wrapper, "_wrappedProtocol", None) is protocol:
            alsoProvides(
                wrapper,
                *[
                    i
                    for i in (IHalfCloseableProtocol, IHandshakeListener)
                    if i.providedBy(protocol)
                ],
            )


def _group(handle: Any) -> str:
    try:
        return handle.get_group_name() or "?"
    except Exception:  # an older pyOpenSSL without it, or no group negotiated
        return "?"


@implementer(IHandshakeListener)
class _Exchange(_Reporting):
    """
    One request and its outcome, in C{self.done}.  A finished exchange closes
    the connection and fires once it is closed (over TLS, after both sides'
    close_notify), so that servers see a clean close.  Cancelling aborts the
    connection; an exchange that had already finished keeps its result.
    """

    _result: object = _PENDING

    def __init__(self) -> None:
        self.done: defer.Deferred[object] = defer.Deferred(self._cancel)

    def _cancel(self, done: defer.Deferred[object]) -> None:
        if self._result is not _PENDING:
            done.callback(self._result)  # only the closing was slow
        self.transport.abortConnection()

    def succeed(self, result: object) -> None:
        if self._result is _PENDING and not self.done.called:
            self._result = result
            self.transport.loseConnection()

    def fail(self, reason: Exception) -> None:
        if not self.done.called:
            self.done.errback(reason)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._result is not _PENDING:
            self.done.callback(self._result)
        else:
            self.ended(reason)

    _answered = False

    def answeredWithTLS(self, chunk: bytes) -> bool:
        """
        Whether the server's first bytes are TLS though we spoke plain (then
        the exchange fails, saying so).
        """
        if self._answered:
            return False
        self._answered = True
        if _looksLikeTLS(chunk) and not ISSLTransport.providedBy(self.transport):
            self.fail(_answeredWithTLS())
            return True
        return False

    def ended(self, reason: Failure) -> None:
        """The connection closed before the exchange finished."""
        self.fail(_lost(reason))


@implementer(IHalfCloseableProtocol)
class _Send(_Exchange):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    _sent = False

    def connectionMade(self) -> None:
        # Half-close, then wait for the server to close: success means it read it all.
        self.transport.write(self.data)
        if self.endInput():
            self._sent = True  # close_notify (or the close) follows the data

    def writeConnectionLost(self) -> None:
        self._sent = True  # every byte went out before the FIN

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # the server closed its side: so do we

    def dataReceived(self, chunk: bytes) -> None:
        # A sink answers nothing; a line service's error reply (the message was too long) fails it.
        if not self.answeredWithTLS(chunk) and (failure := _serverError(chunk)) is not None:
            self.fail(failure)

    def ended(self, reason: Failure) -> None:
        if reason.check(error.ConnectionDone) and self._sent:
            self.done.callback(None)
        elif reason.check(error.ConnectionDone):
            self.fail(ConnectionFailed("the server closed before it had read everything"))
        else:
            super().ended(reason)


class _Echo(_Exchange):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        if not self.data and not ISSLTransport.providedBy(self.transport):
            self.succeed(self.data)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        if not self.data:
            # Nothing to echo: the TLS session (the server's certificate, ours) is the check.
            self.succeed(self.data)

    def dataReceived(self, chunk: bytes) -> None:
        if self._result is not _PENDING or self.answeredWithTLS(chunk):
            return  # all came back (the connection is closing), or TLS
        start, end = self.received, self.received + len(chunk)
        expected = memoryview(self.data)[start:end]
        if expected != chunk:
            at = start + next(
                (i for i, (a, b) in enumerate(zip(expected, chunk, strict=False)) if a != b),
                len(expected),
            )
            if at >= len(self.data):
                self.fail(
                    EchoMismatch(
                        f"echo mismatch: {end - len(self.data)} bytes more came back than the "
                        f"{len(self.data)} sent"
                    )
                )
            else:
                self.fail(EchoMismatch(f"echo mismatch at byte {at} of {len(self.data)}"))
            return
        self.received = end
        if end == len(self.data):
            self.succeed(self.data)

    def ended(self, reason: Failure) -> None:
        if reason.check(error.ConnectionDone):
            self.fail(
                EchoMismatch(
                    f"echo mismatch: the server closed after {self.received} of "
                    f"{len(self.data)} bytes came back"
                )
            )
        else:
            super().ended(reason)


class _Line(_Exchange):
    """Send a line, read one line back."""

    def __init__(self, line: bytes) -> None:
        super().__init__()
        self.line = line + b"\n"
        # The reply to a line is never longer than the line, or is a short error.
        self.limit = len(self.line) + 1024
        self.buffer = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.line)

    def dataReceived(self, chunk: bytes) -> None:
        if self.answeredWithTLS(chunk):
            return
        start = len(self.buffer)
        self.buffer += chunk
        end = self.buffer.find(b"\n", start)
        if end >= 0:
            self.reply(bytes(self.buffer[:end]).removesuffix(b"\r"))
        elif len(self.buffer) > self.limit:
            self.fail(ConnectionFailed(f"reply longer than {self.limit} bytes"))

    def reply(self, line: bytes) -> None:
        failure = _serverError(line)
        if failure is not None:
            self.fail(failure)
        else:
            self.succeed(line)

    def ended(self, reason: Failure) -> None:
        if self.buffer and reason.check(error.ConnectionDone):
            self.reply(bytes(self.buffer))
        else:
            super().ended(reason)


#: How twistsock's line services begin an error reply.
SERVER_ERROR = b"error: "


class _UntilClose(_Exchange):
    """Send a message, read the reply until the server closes."""

    def __init__(self, message: bytes, limit: int) -> None:
        super().__init__()
        self.message = message
        self.limit = limit
        self.buffer = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.message)

    def dataReceived(self, chunk: bytes) -> None:
        if self.answeredWithTLS(chunk):
            return
        self.buffer += chunk
        if len(self.buffer) > self.limit:
            self.fail(ConnectionFailed(f"reply longer than {self.limit} bytes"))

    def ended(self, reason: Failure) -> None:
        if self.buffer and reason.check(error.ConnectionDone):
            reply = bytes(self.buffer)
            failure = _serverError(reply)
            if failure is not None:
                self.done.errback(failure)
            else:
                self.done.callback(reply)
        else:
            super().ended(reason)


def _lost(reason: Failure) -> ClientError:
    if reason.check(tls.VerificationFailed):
        return CertificateError(f"certificate verification failed: {reason.value}")
    if reason.check(SSL.Error):
        text = errorText(reason.value)
        if "certificate verify failed" in text:
            return CertificateError(f"certificate verification failed: {text}")
        return TLSFailed(f"TLS handshake failed: {text}")
    if reason.check(error.ConnectionDone):
        return ConnectionFailed("the server closed the connection without a reply")
    return ConnectionFailed(f"connection lost: {errorText(reason.value)}")


def endpoint(
    target: Target,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    reactor: IReactorTime | None = None,
    family: int = 0,
) -> IStreamClientEndpoint:
    """
    The client endpoint for a target.  C{family} (C{socket.AF_INET} or
    C{AF_INET6}; 0 for either) restricts a TCP or TLS target to IPv4 or IPv6.
    A C{tls:HOST:PORT} target verifies the server's certificate and name
    against the CA certificates in the file C{ca} (else the platform's trust
    store) and presents the key and certificate in the file C{cert}, if given.

    @raise ValueError: malformed target, C{ca} or C{cert} without C{tls:}, or
        an unreadable certificate file.
    """
    if reactor is None:
        from twisted.internet import reactor
    if not (isinstance(target, (str, tuple)) or IStreamClientEndpoint.providedBy(target)):
        raise TypeError(
            "a target is an endpoint string, a (host, port) pair or an "
            f"IStreamClientEndpoint, not {type(target).__name__}"
        )
    if isinstance(target, tuple) and len(target) != 2:
        raise ValueError(f"a (host, port) target has two parts, not {len(target)}")
    if family not in (0, socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be 0, socket.AF_INET or socket.AF_INET6, not {family!r}")
    if isinstance(target, str) and target.startswith("tls:"):
        return _tlsEndpoint(reactor, target, timeout, ca, cert, family)
    if family and not (
        isinstance(target, tuple) or (isinstance(target, str) and target.startswith("tcp:"))
    ):
        raise ValueError(
            "IPv4 or IPv6 only (-4, -6) needs a HOST PORT, tcp: or tls: target, not "
            f"{_describe(target)}"
        )
    if isinstance(target, str) and target.startswith("ssl:"):
        raise ValueError(
            f"{target!r}: ssl: targets do not check the server's certificate; use "
            "tls:HOST:PORT (with --ca FILE for a private CA)"
        )
    if ca or cert:
        raise ValueError("a CA or client certificate needs a tls:HOST:PORT target")
    if IStreamClientEndpoint.providedBy(target):
        return target
    if isinstance(target, tuple):
        host, port = target
        port = _port(port)
        if host.startswith("[") and host.endswith("]"):  # [::1], as in URLs
            host = host[1:-1]
        return streamEndpoint(
            reactor, hostName(host, wildcard=False, scoped=True), int(port), timeout, family=family
        )
    if isinstance(target, str) and target.startswith("tcp:"):
        # Built here: Twisted's tcp: parser splits an IPv6 literal at its
        # colons, wants a whole number of seconds, and resolves IPv4 only.
        try:
            _, host, port, options = splitHostTarget(target)
        except ValueError as e:
            raise ValueError(f"bad target {target!r}: {e}") from None
        unknown = set(options) - {"timeout", "bindAddress"}
        if unknown:
            raise ValueError(f"bad target {target!r}: unknown option {', '.join(sorted(unknown))}")
        bind = options.get("bindAddress")
        return streamEndpoint(
            reactor,
            hostName(host, wildcard=False, scoped=True),
            port,
            _number(options.get("timeout", timeout), target),
            bind,
            family,
        )
    try:
        return clientFromString(reactor, target)
    except Exception as e:  # every parser error is the caller's malformed target
        raise ValueError(f"bad target {target!r}: {errorText(e)}") from None


def _port(port: object) -> int:
    """A port number from an int or its text, or a ValueError that says so."""
    try:
        number = int(port)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return number


def streamEndpoint(
    reactor: Any,
    host: str,
    port: int,
    timeout: float,
    bindAddress: str | None = None,
    family: int = 0,
) -> IStreamClientEndpoint:
    """
    A TCP client endpoint for C{host}: an address literal is connected to as
    it is, with no name resolution; a name goes through Twisted's
    L{HostnameEndpoint} (IPv6 and IPv4 raced) when the reactor runs, and is
    otherwise resolved in a thread of its own first.  A reactor that never
    runs itself (Twisted's asyncio reactor driven by C{asyncio.run}) never
    starts the thread pool Twisted resolves names in, and every name would
    fail, even C{127.0.0.1}, after the whole timeout.
    """
    bind = (bindAddress, 0) if bindAddress else None
    if isIPAddress(host):
        if family == socket.AF_INET6:
            raise ValueError(f"{host} is an IPv4 address, and IPv6 only (-6) was asked for")
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    if isIPv6Address(host):
        if family == socket.AF_INET:
            raise ValueError(f"{host} is an IPv6 address, and IPv4 only (-4) was asked for")
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    if getattr(reactor, "running", True) and not family:
        return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    return _ResolvingEndpoint(reactor, host, port, timeout, bind, family)


@implementer(IStreamClientEndpoint)
class _ResolvingEndpoint:
    """
    Resolve a name in a thread of its own (see L{streamEndpoint}), then connect
    to its first address.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float,
        bindAddress: tuple[str, int] | None,
        family: int = 0,
    ) -> None:
        self.reactor, self.host, self.port, self.timeout, self.bindAddress = (
            reactor,
            host,
            port,
            timeout,
            bindAddress,
        )
        self.family = family

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        pool = ThreadPool(1, 1, "twistsock resolver")
        pool.start()
        found = deferToThreadPool(
            self.reactor,
            pool,
            socket.getaddrinfo,
            self.host,
            self.port,
            self.family,
            socket.SOCK_STREAM,
        )

        def stop(result: object) -> object:
            pool.stop()
            return result

        def connect(addresses: list[Any]) -> defer.Deferred[Any]:
            family, _, _, _, address = addresses[0]
            kind = TCP6ClientEndpoint if family == socket.AF_INET6 else TCP4ClientEndpoint
            return kind(
                self.reactor,
                address[0],
                self.port,
                timeout=self.timeout,
                bindAddress=self.bindAddress,
            ).connect(factory)

        def unknown(reason: Failure) -> Failure:
            if reason.check(socket.gaierror):
                if self.family:
                    raise UnknownHost(
                        f"no IPv{6 if self.family == socket.AF_INET6 else 4} address for "
                        f"{self.host}"
                    )
                raise error.DNSLookupError(self.host)
            return reason

        return found.addBoth(stop).addCallbacks(connect, unknown)


def _number(text: object, target: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"bad target {target!r}: timeout={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"bad target {target!r}: timeout must be more than 0")
    return value


def targetTimeout(target: Target, timeout: float) -> float:
    """The connect timeout a target names itself (C{tcp:HOST:PORT:timeout=1}), else C{timeout}."""
    if isinstance(target, str):
        for field in target.split(":")[1:]:
            if field.startswith("timeout="):
                try:
                    return min(timeout, float(field[len("timeout=") :]))
                except ValueError:
                    return timeout
    return timeout


def _tlsEndpoint(
    reactor, target: str, timeout: float, ca: str | None, cert: str | None, family: int = 0
) -> IStreamClientEndpoint:
    """Build C{tls:} targets here: Twisted's parser fails on IPv6 literals."""
    host, port, options = tls.parseTLSTarget(target)
    unknown = set(options) - {"timeout", "bindAddress", "certificate", "privateKey", "trustRoots"}
    if unknown:
        raise ValueError(f"bad target {target!r}: unknown option {', '.join(sorted(unknown))}")
    if "trustRoots" in options and not ca:
        ca = options["trustRoots"]
    if "certificate" in options and not cert:
        cert = options["certificate"]
    return tls.clientEndpoint(
        reactor,
        host,
        port,
        ca=ca,
        cert=cert,
        privateKey=options.get("privateKey"),
        timeout=float(options.get("timeout", timeout)),
        bindAddress=options.get("bindAddress"),
        family=family,
    )


def _describe(target: Target) -> str:
    """The target as the user wrote it."""
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"a (host, port) target has two parts, not {len(target)}")
        host, port = target
        return f"{host} port {port}"
    return str(target)


def _exchange(
    target: Target,
    protocol: _Exchange,
    timeout: float,
    ca: str | None,
    cert: str | None,
    reactor: IReactorTime | None,
    family: int = 0,
) -> defer.Deferred:
    if reactor is None:
        from twisted.internet import reactor
    where = _describe(target)
    connectTimeout = targetTimeout(target, timeout)
    d = connectProtocol(
        endpoint(target, timeout=timeout, ca=ca, cert=cert, reactor=reactor, family=family),
        protocol,
    )
    d.addCallbacks(lambda p: p.done, lambda f: _timedOutConnecting(f, connectTimeout))
    d.addTimeout(timeout, reactor)
    return _cancellable(d.addErrback(_translate, where, timeout).addErrback(_hintTLS, target))


def _cancellable(inner: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """
    A Deferred that a caller's C{cancel()} fails at once with
    L{defer.CancelledError}, whatever stage the exchange is in (a connection
    attempt cancelled before the reactor started it used to go on until the
    timeout); the exchange beneath is cancelled too.
    """

    cancelled: list[bool] = []

    def cancel(outer: defer.Deferred[Any]) -> None:
        cancelled.append(
            True
        )  # whatever the exchange beneath ends with now, the caller gets CancelledError
        inner.cancel()

    outer: defer.Deferred[Any] = defer.Deferred(cancel)

    def forward(result: object) -> None:
        if not outer.called and not cancelled:
            outer.callback(result)
        # else: cancelled already; what the exchange beneath ends with is dropped

    inner.addBoth(forward)
    return outer


class _ConnectTimeout(Exception):
    """
    The connection was not made within the connect timeout (as the endpoint
    string may set it).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


def _timedOutConnecting(reason: Failure, seconds: float) -> Failure:
    # Twisted's HostnameEndpoint reports its own timeout as a cancelled
    # connection attempt (a full accept queue never completes the handshake).
    if reason.check(error.TimeoutError, error.ConnectingCancelledError):
        raise _ConnectTimeout(seconds)
    return reason


def _translate(reason: Failure, where: str, timeout: float) -> Failure:
    """Turn Twisted's connection errors into L{ClientError}s naming the target."""
    e = reason.value
    if isinstance(e, ClientError):
        raise type(e)(f"{where}: {e}")
    if isinstance(e, (error.DNSLookupError, error.UnknownHostError)):
        raise UnknownHost(f"{where}: unknown host")
    if isinstance(e, error.ConnectionRefusedError) or _errno(e) == errno.ECONNREFUSED:
        raise ConnectionRefused(f"{where}: connection refused")
    if _errno(e) == errno.ENOENT:  # a UNIX socket path where nothing listens
        raise ConnectionRefused(f"{where}: connection refused: {errorText(e)}")
    if isinstance(e, _ConnectTimeout):
        raise Timeout(f"{where}: timed out connecting after {e.seconds:g} s")
    if isinstance(e, (defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError)):
        raise Timeout(f"{where}: timed out after {timeout:g} s")
    if isinstance(e, (error.ConnectError, error.ConnectionLost, OSError)):
        raise ConnectionFailed(f"{where}: {errorText(e)}")
    return reason


#: What OpenSSL says when the server's bytes are not TLS.
_NOT_TLS = (
    "wrong version number",
    "unexpected message",
    "packet length too long",
    "record layer failure",
    "unexpected eof",
    "http request",
    "record_layer_failure",
)


def _hintTLS(reason: Failure, target: Target) -> Failure:
    """
    Say what is likely wrong when a client and a server disagree on TLS: a
    TLS client meeting plain bytes (or a plain server waiting for a line), a
    plain client closed without a word by a TLS port.
    """
    e = reason.value
    tlsTarget = isinstance(target, str) and target.startswith("tls:")
    text = str(e)
    if (
        tlsTarget
        and isinstance(e, (TLSFailed, ConnectionFailed))
        and any(s in text.lower() for s in _NOT_TLS)
    ):
        raise type(e)(
            f"{text} (the server did not answer with TLS: if it is a plain port, use tcp:HOST:PORT)"
        )
    if (
        tlsTarget
        and isinstance(e, ConnectionFailed)
        and ("connection lost" in text.lower() or "without a reply" in text)
    ):
        raise type(e)(
            f"{text} (if the TLS handshake never finished, the server may not speak TLS: then "
            "use tcp:HOST:PORT)"
        )
    if tlsTarget and isinstance(e, Timeout):
        raise Timeout(
            f"{text} (if the TLS handshake never finished, the port may be a plain one "
            "waiting for a line: use tcp:HOST:PORT)"
        )
    return reason


def _errno(e: BaseException | None) -> int | None:
    """The errno of a Twisted connection error (kept in C{osError}) or an OSError."""
    if isinstance(e, error.ConnectError):
        return e.osError if isinstance(e.osError, int) else getattr(e.osError, "errno", None)
    return getattr(e, "errno", None)


# -- streams: standard input to a connection, the connection to standard output --

#: Modes of L{relay}: what is done with the bytes that come back.
RELAY_MODES = ("raw", "send", "echo", "upper")
#: Bytes sent but not yet echoed that C{echo} holds for comparison; reading stops above it.
ECHO_WINDOW = 1 << 20
#: The longest reply line C{upper} accepts in a stream.
MAX_REPLY_LINE = 1 << 20


class RelayResult:
    """What a relay moved: bytes each way and, for C{upper}, lines each way."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.linesSent = 0
        self.linesReceived = 0

    def __repr__(self) -> str:
        return (
            f"<RelayResult sent={self.sent} received={self.received} "
            f"lines={self.linesSent}/{self.linesReceived}>"
        )


def relay(
    target: Target,
    mode: str = "raw",
    *,
    stdin: int = 0,
    stdout: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cert: str | None = None,
    family: int = 0,
    reactor: Any = None,
) -> defer.Deferred[RelayResult]:
    """
    Connect, then stream the file descriptor C{stdin} to the connection and
    what comes back to C{stdout} as it comes, in bounded memory (each side
    stops reading while the other cannot keep up).  At the end of C{stdin}
    the connection is half-closed (over TLS: close_notify); the relay ends
    when the server closes.  C{timeout} bounds connecting only: a stream has
    no deadline.

    Modes: C{raw} writes the bytes that come back as they are (like C{nc});
    C{send} writes nothing and succeeds once the server has read everything
    and closed; C{echo} writes the echoed bytes and fails with
    L{EchoMismatch} at the first difference or if fewer came back; C{upper}
    writes each reply line as C{FROM SERVER: LINE} and fails with
    L{ServerError} on an error reply, or L{ConnectionFailed} if the server
    closed before answering every line (a server without C{--keep-open}
    answers one line per connection).
    """
    if mode not in RELAY_MODES:
        raise ValueError(f"mode must be one of {', '.join(RELAY_MODES)}, not {mode!r}")
    _check(b"", "data", timeout)
    if reactor is None:
        from twisted.internet import reactor
    where = _describe(target)
    seconds = targetTimeout(target, timeout)
    remote = _Remote(mode, reactor, stdin, stdout)
    connecting = connectProtocol(
        endpoint(target, timeout=timeout, ca=ca, cert=cert, reactor=reactor, family=family), remote
    )
    timedOut: list[bool] = []

    def expire() -> None:
        timedOut.append(True)
        connecting.cancel()

    timer = reactor.callLater(seconds, expire)  # connecting only: a stream has no deadline

    def connected(protocol: _Remote) -> defer.Deferred[RelayResult]:
        timer.cancel()
        return protocol.done

    def notConnected(reason: Failure) -> Failure:
        if timer.active():
            timer.cancel()
        if timedOut:
            raise _ConnectTimeout(seconds)
        return _timedOutConnecting(reason, seconds)

    return _cancellable(
        connecting.addCallbacks(connected, notConnected)
        .addErrback(_translate, where, timeout)
        .addErrback(_hintTLS, target)
    )


def _serverError(reply: bytes) -> ServerError | None:
    """The L{ServerError} for a reply that is a line service's error (C{error: ...}), else None."""
    if not reply.startswith(SERVER_ERROR):
        return None
    said = printable(reply[len(SERVER_ERROR) :].split(b"\n", 1)[0].rstrip(b"\r"))
    return ServerError(f"the server answered with an error: {said}", reply)


def _answeredWithTLS() -> TLSFailed:
    return TLSFailed(
        "the server answered with TLS: use tls:HOST:PORT (with --ca FILE for a private CA)"
    )


def _looksLikeTLS(data: bytes) -> bool:
    """
    Whether bytes from a server begin a TLS record (an alert or a handshake): a
    TLS port answering plain bytes.
    """
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03 and data[2] <= 0x04


@implementer(IPushProducer)
class _Gate:
    """
    Standard input's producer, paused for two reasons that do not know of each
    other: the connection's send buffer is full, or the echo window is.
    """

    def __init__(self, terminal: Any) -> None:
        self.terminal = terminal
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons and self.terminal.transport is not None:
            self.terminal.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        self.reasons.discard(reason)
        if not self.reasons and self.terminal.transport is not None:
            self.terminal.transport.resumeProducing()

    # IPushProducer, for the connection's transport
    def pauseProducing(self) -> None:
        self.pause("transport")

    def resumeProducing(self) -> None:
        self.resume("transport")

    def stopProducing(self) -> None:
        if self.terminal.transport is not None:
            self.terminal.transport.loseConnection()


@implementer(IPushProducer)
class _Reading:
    """
    The connection as standard output's producer: paused and resumed with
    it, but never stopped by it (a writer that fails stops its producer;
    what then happens to the connection is L{_Remote.outputGone}'s choice).
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _Terminal(Protocol):
    """Standard input and output, as one half of a relay."""

    transport: _StandardIO | None

    def __init__(self, remote: _Remote) -> None:
        self.remote = remote
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.remote.send(data)

    def readConnectionLost(self) -> None:
        self.ended = True
        self.remote.inputEnded()

    def writeConnectionLost(self) -> None:
        # Standard output closed (a reader that went away, like `| head`): nothing more to show.
        self.remote.outputGone()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.remote.terminalClosed()


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _Remote(_Reporting):
    """The connection half of a relay; see L{relay}."""

    def __init__(self, mode: str, reactor: Any, stdin: int, stdout: int) -> None:
        self.mode = mode
        self.reactor = reactor
        self.fds = (stdin, stdout)
        self.result = RelayResult()
        self.done: defer.Deferred[RelayResult] = defer.Deferred(self._cancel)
        self.terminal = _Terminal(self)
        self.gate = _Gate(self.terminal)
        self.pending = bytearray()  # echo: sent, not yet back; upper: a reply line in pieces
        self.failure: Exception | None = None
        self.first = True

    def _cancel(self, done: defer.Deferred[RelayResult]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()
        terminal = self.terminal.transport
        if terminal is not None and not terminal.disconnected:
            terminal.loseConnection()

    def connectionMade(self) -> None:
        from twisted.internet import stdio

        stdin, stdout = self.fds
        # The type checker sees Windows' StandardIO, which has no stdin and stdout.
        stdio.StandardIO(self.terminal, stdin=stdin, stdout=stdout, reactor=self.reactor)  # type: ignore[call-arg]
        self.transport.registerProducer(self.gate, True)
        assert self.terminal.transport is not None  # StandardIO connected it
        self.terminal.transport.registerProducer(_Reading(self.transport), True)

    # standard input -> the connection

    def send(self, data: bytes) -> None:
        if self.done.called or self.failure is not None:
            return
        self.result.sent += len(data)
        self._lastByte = data[-1:] or self._lastByte
        if self.mode == "upper":
            self.result.linesSent += data.count(b"\n")
        elif self.mode == "echo":
            self.pending += data
            if len(self.pending) > ECHO_WINDOW:
                self.gate.pause("window")
        self.transport.write(data)

    def inputEnded(self) -> None:
        if self.mode == "upper" and self.result.sent and not self._endsInNewline:
            self.transport.write(b"\n")  # a last line without its newline is still a line
            self.result.linesSent += 1
            self._lastByte = b"\n"
        self.transport.unregisterProducer()
        self.endInput()

    @property
    def _linesStarted(self) -> int:
        """Lines sent so far, counting one sent in part (the server may close in the middle)."""
        partial = self.result.sent and not self._endsInNewline
        return self.result.linesSent + (1 if partial else 0)

    @property
    def _endsInNewline(self) -> bool:
        # Only the count of newlines is kept: a last line lacks one if fewer
        # newlines than lines were seen.
        return self._lastByte == b"\n"

    _lastByte = b""

    # the connection -> standard output

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        if self.first:
            self.first = False
            if (
                self.mode != "raw"
                and _looksLikeTLS(data)
                and not ISSLTransport.providedBy(self.transport)
            ):
                self._fail(_answeredWithTLS())
                return
        self.result.received += len(data)
        if (
            self.mode == "send"
            and self.result.received == len(data)
            and (failure := _serverError(data)) is not None
        ):
            self._fail(failure)
            return
        if self.mode == "raw":
            self.show(data)
        elif self.mode == "echo":
            self._echoed(data)
        elif self.mode == "upper":
            self._replies(data)
        # send: a sink answers nothing; whatever comes is not shown

    def _echoed(self, data: bytes) -> None:
        expected = self.pending[: len(data)]
        if expected != data:
            at = (
                self.result.received
                - len(data)
                + next(
                    (i for i, (a, b) in enumerate(zip(expected, data, strict=False)) if a != b),
                    len(expected),
                )
            )
            self._fail(EchoMismatch(f"echo mismatch at byte {at} of {self.result.sent} sent"))
            return
        del self.pending[: len(data)]
        self.show(data)
        if len(self.pending) <= ECHO_WINDOW // 2:
            self.gate.resume("window")

    def _replies(self, data: bytes) -> None:
        start = len(self.pending)
        self.pending += data
        while (end := self.pending.find(b"\n", start)) >= 0:
            line = bytes(self.pending[:end]).removesuffix(b"\r")
            del self.pending[: end + 1]
            start = 0
            self.result.linesReceived += 1
            failure = _serverError(line)
            if failure is not None:
                self._fail(failure)
                return
            self.show(b"FROM SERVER: " + line + b"\n")
        if len(self.pending) > MAX_REPLY_LINE:
            self._fail(ConnectionFailed(f"reply line longer than {MAX_REPLY_LINE} bytes"))

    def _fail(self, reason: Exception) -> None:
        self.failure = reason
        self.transport.abortConnection()

    _outputGone = False

    def outputGone(self) -> None:
        # Whoever read our output stopped (`| head`). raw and send end quietly, as a
        # pipeline expects; echo and upper go on checking what comes back, unshown.
        self._outputGone = True
        if self.mode in ("echo", "upper"):
            if self.transport is not None:
                self.transport.resumeProducing()  # the output that paused it is gone
            return
        if self.transport is not None:
            self.transport.abortConnection()

    def show(self, data: bytes) -> None:
        if not self._outputGone and self.terminal.transport is not None:
            self.terminal.transport.write(data)

    def readConnectionLost(self) -> None:
        # The server half-closed: it will send nothing more; finish as if it closed.
        self.transport.loseConnection()

    _sentAll = False

    def writeConnectionLost(self) -> None:
        self._sentAll = True  # our FIN went out after every byte of standard input

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        clean = (
            reason is None
            or reason.check(error.ConnectionDone)
            or (self._outputGone and self.mode not in ("echo", "upper"))
        )
        failure = self.failure
        delivered = self._sentAll or (
            self.terminal.ended and ISSLTransport.providedBy(self.transport)
        )
        if (
            failure is None
            and self.mode == "send"
            and not delivered
            and not reason.check(SSL.Error)
        ):
            # Closed, or reset for the bytes it did not read: either way, not delivered.
            how = "" if clean else f"; {errorText(reason.value)}"
            failure = ConnectionFailed(
                f"the server closed before it had read everything ({self.result.sent} bytes "
                f"of standard input sent so far{how})"
            )
        if failure is None and not clean:
            failure = _lost(reason)
        if (
            failure is None
            and not delivered
            and (self.mode == "echo" or (self.mode == "upper" and self._linesStarted > 1))
            and self.result.linesReceived >= self._linesStarted
            and not self.pending
        ):
            # Everything sent so far came back, but standard input went on: the server (an
            # echo server, or an upper server that answered several lines) stopped early.
            # A one-line upper server closing after its one answer is what it is meant to do.
            failure = (EchoMismatch if self.mode == "echo" else ConnectionFailed)(
                f"the server closed before the end of standard input ({self.result.sent} bytes "
                "sent so far, all answered)"
            )
        if failure is None and self.mode == "echo" and self.pending:
            failure = EchoMismatch(
                f"echo mismatch: the server closed after {self.result.received} of "
                f"{self.result.sent} bytes came back"
            )
        if (
            failure is None
            and self.mode == "upper"
            and self.result.linesReceived < self._linesStarted
        ):
            failure = (
                ConnectionFailed("the server closed the connection without a reply")
                if not self.result.received
                else ConnectionFailed(
                    f"the server closed after answering {self.result.linesReceived} of "
                    f"{self._linesStarted} lines "
                    "(it answers one line per connection unless started with --keep-open)"
                )
            )
        self._finish(failure)

    _finished = False

    def _finish(self, failure: Exception | None) -> None:
        """The connection is over: flush standard output, then fire (see L{terminalClosed})."""
        self.failure = failure
        self._finished = True
        terminal = self.terminal.transport
        if terminal is not None and not terminal.disconnected:
            # Standard output's writer resumes a paused producer instead of closing:
            # the connection, gone now, must not be its producer any more.
            terminal.unregisterProducer()
        if terminal is None or terminal.disconnected:
            self._fire()
        elif self._outputGone:
            # Stops reading standard input; with no output left, nothing calls
            # back.
            terminal.loseConnection()
            self._fire()
        else:
            terminal.loseConnection()  # flushes standard output, then terminalClosed

    def terminalClosed(self) -> None:
        if self._finished:
            self._fire()

    def _fire(self) -> None:
        if self.done.called:
            return  # cancelled meanwhile
        if self.failure is not None:
            self.done.errback(self.failure)
        else:
            self.done.callback(self.result)
