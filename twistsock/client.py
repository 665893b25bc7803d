"""
The twistsock clients, for scripts: one function per service, each returning a
L{Deferred}.

    from twisted.internet import task
    from twistsock import client

    def main(reactor):
        d = client.echo("tcp:127.0.0.1:5000", b"hello", reactor=reactor)
        return d.addCallback(print)

    task.react(main)

A target is a Twisted client endpoint string (C{tcp:127.0.0.1:5000},
C{unix:path=/tmp/echo.sock}), a C{(host, port)} pair (host names, IPv4 and
IPv6 literals such as C{::1}), or an L{IStreamClientEndpoint}.  Every
operation is bounded by C{timeout} seconds, connecting included.  Failures
are L{ClientError} subclasses whose C{exitStatus} the C{twistsock} command
exits with; a malformed target raises L{ValueError} at once.
"""

from __future__ import annotations

import errno
from typing import Union

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

__all__ = [
    "Target",
    "ClientError",
    "UnknownHost",
    "ConnectionRefused",
    "Timeout",
    "EchoMismatch",
    "ConnectionFailed",
    "DEFAULT_TIMEOUT",
    "endpoint",
    "send",
    "echo",
    "upper",
    "ack",
]

Target = Union[str, "tuple[str, int]", IStreamClientEndpoint]

#: Seconds an operation may take, connecting included, unless told otherwise.
DEFAULT_TIMEOUT = 10.0

#: The longest reply C{ack} reads; seed 003's server sends 18 bytes.
MAX_ACK_REPLY = 64 * 1024


class ClientError(Exception):
    """An operation failed; the message is one line for the user."""

    #: The status the C{twistsock} command exits with.
    exitStatus = 1


class ConnectionFailed(ClientError):
    """The connection could not be made or broke off."""

    exitStatus = 1


class UnknownHost(ClientError):
    """The host name does not resolve (seed 000 exits 2 here too)."""

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


def send(target: Target, data: bytes, *, timeout: float = DEFAULT_TIMEOUT, reactor: IReactorTime | None = None) -> defer.Deferred[None]:
    """
    Send C{data}, then close (seed 000's streamwrite).  Fires with L{None}
    once every byte is handed to the peer's kernel and the connection closed.
    """
    return _exchange(target, _Send(data), timeout, reactor)


def echo(target: Target, data: bytes, *, timeout: float = DEFAULT_TIMEOUT, reactor: IReactorTime | None = None) -> defer.Deferred[bytes]:
    """
    Send C{data} and read until all of it is back (seeds 001 and 004).  Fires
    with the echoed bytes; fails with L{EchoMismatch} at the first byte that
    differs, on extra bytes, or if the server closes before all came back.
    """
    return _exchange(target, _Echo(data), timeout, reactor)


def upper(target: Target, line: bytes, *, timeout: float = DEFAULT_TIMEOUT, reactor: IReactorTime | None = None) -> defer.Deferred[bytes]:
    """
    Send one line and fire with the server's reply line, without its ending
    (seed 002's TCPClient).
    """
    if b"\n" in line:
        raise ValueError("upper sends one line: the line must not contain a newline")
    return _exchange(target, _Line(line), timeout, reactor)


def ack(target: Target, message: bytes, *, timeout: float = DEFAULT_TIMEOUT, reactor: IReactorTime | None = None) -> defer.Deferred[bytes]:
    """
    Send one message (a line) and fire with the server's reply, read until it
    closes (seed 003's client).
    """
    if b"\n" in message.rstrip(b"\n"):
        raise ValueError("ack sends one message: the message must not contain a newline")
    return _exchange(target, _UntilClose(message.rstrip(b"\n") + b"\n", MAX_ACK_REPLY), timeout, reactor)


class _Exchange(Protocol):
    """One request and its outcome, in C{self.done}; cancelling it aborts the connection."""

    def __init__(self) -> None:
        self.done: defer.Deferred[object] = defer.Deferred(lambda d: self.transport.abortConnection())

    def succeed(self, result: object) -> None:
        if not self.done.called:
            self.done.callback(result)
            self.transport.loseConnection()

    def fail(self, reason: Exception) -> None:
        if not self.done.called:
            self.done.errback(reason)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.done.called:
            self.ended(reason)

    def ended(self, reason: Failure) -> None:
        """The connection closed before the exchange finished."""
        self.fail(_lost(reason))


class _Send(_Exchange):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        self.transport.loseConnection()

    def ended(self, reason: Failure) -> None:
        if reason.check(error.ConnectionDone):
            self.done.callback(None)
        else:
            super().ended(reason)


class _Echo(_Exchange):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        if not self.data:
            self.succeed(self.data)

    def dataReceived(self, chunk: bytes) -> None:
        start, end = self.received, self.received + len(chunk)
        expected = memoryview(self.data)[start:end]
        if expected != chunk:
            at = start + next((i for i, (a, b) in enumerate(zip(expected, chunk)) if a != b), len(expected))
            if at >= len(self.data):
                self.fail(EchoMismatch(f"echo mismatch: {end - len(self.data)} bytes more came back than the {len(self.data)} sent"))
            else:
                self.fail(EchoMismatch(f"echo mismatch at byte {at} of {len(self.data)}"))
            return
        self.received = end
        if end == len(self.data):
            self.succeed(self.data)

    def ended(self, reason: Failure) -> None:
        if reason.check(error.ConnectionDone):
            self.fail(EchoMismatch(f"echo mismatch: the server closed after {self.received} of {len(self.data)} bytes came back"))
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
        start = len(self.buffer)
        self.buffer += chunk
        end = self.buffer.find(b"\n", start)
        if end >= 0:
            self.succeed(bytes(self.buffer[:end]).removesuffix(b"\r"))
        elif len(self.buffer) > self.limit:
            self.fail(ConnectionFailed(f"reply longer than {self.limit} bytes"))

    def ended(self, reason: Failure) -> None:
        if self.buffer and reason.check(error.ConnectionDone):
            self.succeed(bytes(self.buffer))
        else:
            super().ended(reason)


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
        self.buffer += chunk
        if len(self.buffer) > self.limit:
            self.fail(ConnectionFailed(f"reply longer than {self.limit} bytes"))

    def ended(self, reason: Failure) -> None:
        if self.buffer and reason.check(error.ConnectionDone):
            self.done.callback(bytes(self.buffer))
        else:
            super().ended(reason)


def _lost(reason: Failure) -> ClientError:
    if reason.check(error.ConnectionDone):
        return ConnectionFailed("the server closed the connection without a reply")
    return ConnectionFailed(f"connection lost: {_why(reason.value)}")


def _why(e: BaseException) -> str:
    """The OS error text of a Twisted connection error, else its message."""
    if isinstance(e, (error.ConnectError, error.ConnectionLost)) and e.args and isinstance(e.args[0], str):
        # getConnectError() and the transports put the OS error text here.
        return e.args[0].strip().rstrip(".") or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().rstrip(".") or type(e).__name__


def endpoint(target: Target, *, timeout: float = DEFAULT_TIMEOUT, reactor: IReactorTime | None = None) -> IStreamClientEndpoint:
    """
    The client endpoint for a target.

    @raise ValueError: malformed endpoint string or port.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    if IStreamClientEndpoint.providedBy(target):
        return target
    if isinstance(target, tuple):
        host, port = target
        if not 0 < int(port) < 65536:
            raise ValueError(f"port {port} is not between 1 and 65535")
        return HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    try:
        return clientFromString(reactor, target)
    except Exception as e:  # every parser error is the caller's malformed target
        raise ValueError(f"bad target {target!r}: {e}") from None


def _describe(target: Target) -> str:
    """The target as the user wrote it."""
    if isinstance(target, tuple):
        host, port = target
        return f"{host} port {port}"
    return str(target)


def _exchange(target: Target, protocol: _Exchange, timeout: float, reactor: IReactorTime | None) -> defer.Deferred:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    where = _describe(target)
    d = connectProtocol(endpoint(target, timeout=timeout, reactor=reactor), protocol)
    d.addCallback(lambda p: p.done)
    d.addTimeout(timeout, reactor)
    return d.addErrback(_translate, where, timeout)


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
        raise ConnectionRefused(f"{where}: connection refused: {_why(e)}")
    if isinstance(e, (defer.TimeoutError, error.TimeoutError)):
        raise Timeout(f"{where}: timed out after {timeout:g} s")
    if isinstance(e, (error.ConnectError, error.ConnectionLost, OSError)):
        raise ConnectionFailed(f"{where}: {_why(e)}")
    return reason


def _errno(e: BaseException) -> int | None:
    """The errno of a Twisted connection error (kept in C{osError}) or an OSError."""
    if isinstance(e, error.ConnectError):
        return e.osError if isinstance(e.osError, int) else getattr(e.osError, "errno", None)
    return getattr(e, "errno", None)
