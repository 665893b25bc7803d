"""
The services, looked up by name: C{echo}, C{upper}, C{sink}, C{ack}.

Each is one small L{Protocol} that knows nothing of the transport beneath it
(TCP, TCP6, UNIX, TLS, PROXY), and a datagram twin: a function from one
datagram to its reply.  What every stream service shares, bounded buffering
and half-close, lives in L{StreamService}; line framing and its limit live in
L{LineService}.  What every datagram service shares lives in L{twistsock.udp}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._format import describe, printable
from ._types import IStreamTransport

#: The default longest line C{upper} and C{ack} accept, in bytes.
DEFAULT_MAX_LINE = 64 * 1024

ACK_REPLY = b"I got your message"


@dataclass(frozen=True)
class ServiceConfig:
    """Settings shared by every connection of one listening service."""

    #: Longest line (without its C{\\n} or C{\\r\\n}) that line services accept.
    maxLine: int = DEFAULT_MAX_LINE
    #: Whether C{upper} answers every line until the client closes, instead
    #: of one line per connection as the Java TCPServer does.
    keepOpen: bool = False


_DEFAULT_CONFIG = ServiceConfig()


@implementer(IHalfCloseableProtocol)
class StreamService(Protocol):
    """
    What every stream service shares.

    Bounded memory: the transport is registered as its own producer, so it
    stops reading while more than its buffer limit waits to be sent to a peer
    that does not read.  Half-close: when the peer shuts down its sending
    side, L{inputEnded} runs, what is pending is sent, then the connection
    closes.  Closing with input left unread: what is pending is sent, then
    the sending side is shut down and input is read and dropped until the
    peer closes (see L{finish}).
    """

    _finishing = False
    #: Bytes of unwanted input still to be read and dropped before an abrupt
    #: close; None until the service closes (see L{finish}).
    _discarding: int | None = None

    transport: IStreamTransport

    #: The settings of this connection's service: its factory's, held once for
    #: all its connections (given by L{ServiceFactory.buildProtocol}).
    config: ServiceConfig = _DEFAULT_CONFIG

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)

    def inputEnded(self) -> None:
        """The peer will send nothing more; override to answer a last time."""

    def readConnectionLost(self) -> None:
        if self._discarding is not None:
            self.transport.loseConnection()  # the peer stopped sending: done
            return
        self.inputEnded()
        self.finish()

    def writeConnectionLost(self) -> None:
        """Never asked for: we only close both directions."""

    #: Bytes of unwanted input a closing connection reads and drops at most.
    DISCARD_LIMIT = 256 * 1024

    def finish(self, inputLeft: bool = False) -> None:
        """
        Close once everything written so far has been sent.

        C{inputLeft}: the peer sent more than the service will read.  Closing
        a socket with unread input makes the kernel reset the connection, and
        a reset throws away whatever of the reply the peer has not received
        yet.  So the reply is sent, the sending side shut down (the peer sees
        the end of the reply), and input is dropped until the peer closes:
        at most L{DISCARD_LIMIT} bytes, for at most the line deadline (a line
        service waits for nothing else meanwhile), then the close is abrupt.
        Over TLS, which cannot shut down one side, the close is as usual: but
        TLS then waits for the peer's close_notify with the connection open,
        and what the peer sends meanwhile is dropped within the same bounds.
        """
        if self._finishing:
            return
        self._finishing = True
        # A paused self-producer would keep a closing transport open forever
        # (FileDescriptor.doWrite resumes it instead of closing), so detach it.
        self.transport.unregisterProducer()
        self._discarding = self.DISCARD_LIMIT
        if inputLeft:
            closeWriting = getattr(self.transport, "closeWriting", None)
            if closeWriting is not None and closeWriting():
                return
        self.transport.loseConnection()

    def discard(self, data: bytes) -> None:
        """Drop input that arrives while closing; close abruptly past the limit."""
        if self._discarding is None:
            return
        self._discarding -= len(data)
        if self._discarding < 0:
            self._discarding = None
            self.transport.abortConnection()

    def peer(self) -> str:
        """The client's address as text; behind a PROXY header, the real client."""
        return describe(self.transport.getPeer())


class Echo(StreamService):
    """Send back every byte received (RFC 862; the classic TCP echo servers)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


#: Messages one connection logs in full; the rest are counted, and one line
#: at the end says how many (and how many bytes) were not logged.
MESSAGE_LINES = 100


class Sink(StreamService):
    """Log every message received and send nothing (streamread)."""

    log = Logger()
    _logged = 0
    _unlogged = 0
    _unloggedBytes = 0

    def dataReceived(self, data: bytes) -> None:
        if self._logged < MESSAGE_LINES:
            self._logged += 1
            self.log.info("{peer} -->{message}", peer=self.peer(), message=printable(data))
        else:
            self._unlogged += 1
            self._unloggedBytes += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._unlogged:
            self.log.info(
                "{peer} {count} more messages ({size} bytes) not logged: {limit} a connection are",
                peer=self.peer(),
                count=self._unlogged,
                size=self._unloggedBytes,
                limit=MESSAGE_LINES,
            )
        self.log.info("{peer} Ending connection", peer=self.peer())


class LineService(StreamService):
    """
    Call L{lineReceived} for each line ending in C{\\n} or C{\\r\\n}; a last
    line without an ending counts when the peer half-closes.  A line longer
    than C{config.maxLine} gets a one-line error reply and the connection
    closes.  Unless L{keepOpen} is true, the connection closes after the
    first line.
    """

    _buffer: bytearray
    _done = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._buffer = bytearray()

    #: Lines answered so far.
    lines = 0

    def lineWaiting(self) -> bool:
        """
        Whether part of a line has arrived and waits for the rest, or input
        the service will not read is still arriving (what a line deadline times).
        """
        return (not self._done and bool(self._buffer)) or self._discarding is not None

    def keepOpen(self) -> bool:
        """Whether to answer more than one line per connection."""
        return self.config.keepOpen

    def lineReceived(self, line: bytes) -> None:
        """Answer one line (without its ending)."""
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            self.discard(data)
            return
        buffer = self._buffer
        # Only the new bytes can hold a line ending we have not seen yet: a
        # line that arrives one byte at a time costs linear time, not quadratic.
        start = len(buffer)
        buffer += data
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            start = 0
            if not self._line(line[:-1] if line.endswith(b"\r") else line):
                return
        # One byte more than the limit may be the "\r" of a "\r\n" ending.
        if len(buffer) > self.config.maxLine + 1:
            self._tooLong()

    def inputEnded(self) -> None:
        if self._buffer and not self._done:
            self._line(bytes(self._buffer))

    def _line(self, line: bytes) -> bool:
        """Answer one line; return whether to go on reading."""
        if len(line) > self.config.maxLine:
            self._tooLong()
            return False
        self.lines += 1
        self.lineReceived(line)
        if not self.keepOpen():
            self._stop()
            return False
        return True

    def _tooLong(self) -> None:
        self.transport.write(b"error: line longer than %d bytes\n" % (self.config.maxLine,))
        self._stop()

    def _stop(self) -> None:
        self._done = True
        inputLeft = bool(self._buffer)  # bytes after the last line answered, or a line too long
        self._buffer.clear()
        self.finish(inputLeft)


class Upper(LineService):
    """
    Reply to each line with it upper-cased, plus C{\\n} (the Java
    TCPServer).  Only ASCII letters change: every other byte, UTF-8 or
    binary, comes back as it was, so the reply is never longer than the line.
    """

    def lineReceived(self, line: bytes) -> None:
        self.transport.write(line.upper() + b"\n")


class Ack(LineService):
    """
    Log the message and reply C{I got your message} (the sockets tutorial's server.c):
    one message, a line, per connection.
    """

    log = Logger()

    def keepOpen(self) -> bool:
        return False

    def lineReceived(self, line: bytes) -> None:
        self.log.info(
            "{peer} Here is the message: {message}", peer=self.peer(), message=printable(line)
        )
        self.transport.write(ACK_REPLY)


# -- the datagram twins: each takes a datagram and its sender, and returns the reply or None --


def echoDatagram(data: bytes, peer: str) -> bytes:
    """Send the datagram back (RFC 862 over UDP)."""
    return data


def upperDatagram(data: bytes, peer: str) -> bytes:
    """Send the datagram back upper-cased (ASCII letters only: the same length)."""
    return data.upper()


class DatagramQuota:
    """
    At most C{lines} datagram messages logged a second, over all sources; the
    others are counted, and the first line logged after them says how many.
    """

    def __init__(
        self, lines: int = MESSAGE_LINES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lines = lines
        self.clock = clock
        self._second = -1
        self._used = 0
        self._skipped = 0

    def allow(self, log: Logger) -> bool:
        second = int(self.clock())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.lines:
            self._skipped += 1
            return False
        self._used += 1
        self.summarize(log)
        return True

    def summarize(self, log: Logger) -> None:
        """Say how many messages were left out since the last time, if any."""
        if self._skipped:
            log.info(
                "{count} datagram messages not logged: {limit} a second are",
                count=self._skipped,
                limit=self.lines,
            )
            self._skipped = 0


datagramQuota = DatagramQuota()


def summarizeDatagrams() -> None:
    """At shutdown: the datagram messages left out since the last summary."""
    datagramQuota.summarize(Sink.log)


def sinkDatagram(data: bytes, peer: str) -> None:
    """Log the datagram; answer nothing."""
    if datagramQuota.allow(Sink.log):
        Sink.log.info("{peer} -->{message}", peer=peer, message=printable(data))


def ackDatagram(data: bytes, peer: str) -> bytes:
    """Log the datagram and acknowledge it."""
    if datagramQuota.allow(Ack.log):
        Ack.log.info(
            "{peer} Here is the message: {message}",
            peer=peer,
            message=printable(data.rstrip(b"\r\n")),
        )
    return ACK_REPLY


#: The stream services by the name C{--listen SERVICE@ENDPOINT} uses.
SERVICES: dict[str, type[StreamService]] = {
    "echo": Echo,
    "upper": Upper,
    "sink": Sink,
    "ack": Ack,
}


#: The datagram twins, by the same names, for C{--listen SERVICE@udp:PORT}.
DATAGRAM_SERVICES = {
    "echo": echoDatagram,
    "upper": upperDatagram,
    "sink": sinkDatagram,
    "ack": ackDatagram,
}


class ServiceFactory(Factory[StreamService]):
    """Build the protocols of one named service, all sharing one L{ServiceConfig}."""

    noisy = False
    protocol: type[StreamService]

    def __init__(self, name: str, config: ServiceConfig = ServiceConfig()) -> None:
        self.name = name
        self.protocol = SERVICES[name]
        self.config = config

    def buildProtocol(self, addr: object) -> StreamService:
        protocol = self.protocol()
        protocol.factory = self
        protocol.config = self.config
        return protocol

    def logPrefix(self) -> str:
        return self.name
