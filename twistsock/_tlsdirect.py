"""
Twisted's TLS layer with replies that leave without waiting for the reactor,
and with no OpenSSL state for a client until it sends: L{DirectTLSProtocol},
set on every TLS port twistsock listens on by L{useDirectTLS}.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from OpenSSL import SSL
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from ._direct import canWriteDirectly, writeDirectly
from ._layer import closeWriting
from ._types import IStreamTransport

# pyOpenSSL's own bindings: how many bytes a memory BIO holds (pyOpenSSL's
# crypto module uses it too).
try:
    from OpenSSL.SSL import _ffi, _lib

    _memoryBIOSize = _lib.BIO_get_mem_data
    _NULL = _ffi.NULL
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _memoryBIOSize = None


#: Bytes asked of SSL_read at a time: more than a TLS record holds (16 KiB).
_READ = 2**15


def _mallocTrim() -> Callable[[int], int] | None:
    """glibc's C{malloc_trim}, or None where the C library has none (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    return trim


class HeapTrimmer:
    """
    Give the memory of finished TLS connections back to the system after a
    burst of them.

    A handshake's OpenSSL state is some fifty small allocations (the largest
    21 KiB) that glibc serves from its main heap.  Freed, they stay in the
    heap for reuse: the heap only shrinks from its top, which live objects
    pin.  C{malloc_trim} hands the free pages back (C{MADV_DONTNEED}); it
    walks the whole heap (1 ms when there is nothing to give, 10 ms after
    2,000 handshakes ended), so it runs once, L{delay} seconds after the
    number of live OpenSSL connections fell L{threshold} below its highest
    since the last trim: after a burst, never under a steady load.
    """

    #: How far the live connections must fall below their peak: 256 handshakes hold about 13 MiB.
    threshold = 256
    #: Seconds from the fall to the trim, so that one trim follows a whole burst.
    delay = 1.0

    def __init__(self, trim: Callable[[int], int] | None) -> None:
        self._trim = trim
        self._pending: Any = None
        #: OpenSSL connections alive, and the most there were since the last trim.
        self.live = self.peak = 0
        #: Trims done.
        self.trims = 0

    def opened(self) -> None:
        self.live += 1
        if self.live > self.peak:
            self.peak = self.live

    def closed(self, clock: Any) -> None:
        self.live -= 1
        if (
            self._pending is None
            and self._trim is not None
            and self.peak - self.live >= self.threshold
        ):
            self._pending = clock.callLater(self.delay, self._trimNow)

    def _trimNow(self) -> None:
        self._pending = None
        self.peak = self.live
        if self._trim is not None:
            self.trims += 1
            self._trim(0)


#: The process's one heap.
HEAP = HeapTrimmer(_mallocTrim())


def _sizeOf(connection: Any, bio: str) -> Callable[[], int]:
    """
    How to read the size of one of a memory-BIO connection's BIOs
    (C{_into_ssl}, C{_from_ssl}): a function that answers -1 (unknown) if
    pyOpenSSL's bindings do not allow it.
    """
    pointer = getattr(connection, bio, None)
    if _memoryBIOSize is None or pointer is None:
        return lambda: -1
    return partial(_memoryBIOSize, pointer, _NULL)


@implementer(IHalfCloseableProtocol)
class DirectTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS, with replies that leave without waiting for the reactor.

    Twisted's default (C{BufferingTLSTransport}) gathers every write into a
    C{callLater(0)} and encrypts it on the next reactor pass, then hands the
    records to a transport that buffers them for one more pass: a reply costs
    two extra passes.  Here writes made while received data is being
    delivered are gathered until that delivery ends and leave then, as one
    TLS record where they fit in one; other writes are encrypted at once; and
    the records go to the socket at once when nothing waits to be sent
    (L{writeDirectly}).  pyOpenSSL reports an empty BIO or nothing left to
    decrypt by raising an exception; the BIOs' sizes are read instead where
    pyOpenSSL's bindings allow.  Everything else (handshake, producers,
    shutdown, errors) is Twisted's.

    The peer's close_notify is a half-close, as a FIN is over TCP: a protocol
    that handles half-close (L{IHalfCloseableProtocol}) is told that input
    ended and may still write; our close_notify goes when it closes.  (Twisted
    closes the whole connection at once, so the reply to the last request is
    lost.)  A FIN after the close_notify changes nothing.  A FIN without one,
    after the handshake, ends the input the same way (OpenSSL's
    C{SSL_OP_IGNORE_UNEXPECTED_EOF} for services that can half-close: ncat
    and many scripts close so); during the handshake it loses the
    connection, as in Twisted.  When the protocol closes, our close_notify is
    followed by a FIN (Twisted waits for the peer's close_notify with the
    connection open), and a peer that closes after it without one of its own
    ends the connection cleanly.

    It is a server's protocol, and its OpenSSL connection is made once the
    client's whole ClientHello has come, not when the client connects: until
    then OpenSSL can do nothing but wait, and its state for a handshake (46
    to 52 KiB: the connection, and the buffers its first
    C{SSL_do_handshake} makes) is what a client that stays silent, or sends
    a few bytes and stops, would hold for the whole handshake deadline.
    Such a client now costs what a TCP connection costs, and the bytes it
    sent (L{ClientHello} says what is held; anything that cannot be the
    start of a ClientHello goes to OpenSSL at once, to be refused as
    before).  OpenSSL then gets the same bytes, and answers the same: a
    client that closes early gets what Twisted gives it (OpenSSL's alert
    for a truncated handshake), and the protocol beneath is told of the same
    C{ConnectionLost}.  The OpenSSL connections made and freed are told to
    L{HEAP}.
    """

    #: The OpenSSL connection: None until the client's ClientHello is whole.
    _tlsConnection: Any = None
    #: What came before that.
    _hello: ClientHello | None = None
    heap = HEAP

    _inputEnded = False
    _peerGone = False
    _finSent = False

    def _closeNotifySent(self) -> bool:
        connection = self._tlsConnection
        return connection is not None and bool(connection.get_shutdown() & SSL.SENT_SHUTDOWN)

    _direct = False
    _delivering = False
    _held: list[bytes]

    #: The socket transport beneath, from makeConnection on.
    transport: IStreamTransport

    def makeConnection(self, transport: Any) -> None:
        self._direct = canWriteDirectly(transport)
        self._held = []
        # Twisted's makeConnection (26.10) without its first lines, which
        # make the OpenSSL connection, and its last, which starts a
        # handshake that for a server waits for the client anyway.
        self._appSendBuffer = []
        for interface in providedBy(transport):
            directlyProvides(self, interface)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)

    def _startTLS(self) -> None:
        """Make the OpenSSL connection."""
        self._tlsConnection = self.factory._creatorCallable(self)
        self.heap.opened()

    def _startTLSNow(self) -> None:
        """Make the OpenSSL connection before the ClientHello is whole, and give it what came."""
        hello, self._hello = self._hello, None
        self._startTLS()
        if hello is not None and hello.data:
            self.dataReceived(bytes(hello.data))

    def dataReceived(self, data: bytes) -> None:
        if self._tlsConnection is None:
            hello = self._hello
            if hello is None:
                hello = self._hello = ClientHello()
            if hello.add(data):
                return
            self._hello = None
            data = bytes(hello.data)
            if data[:1] != b"\x16":
                # Not TLS at all (a plain client on a TLS port): OpenSSL will
                # refuse it without a word, so say it in TLS, as a fatal
                # protocol_version alert, the one thing any client can tell
                # from plain silence.
                self.transport.write(NOT_TLS_ALERT)
            self._startTLS()
        self._delivering = True
        try:
            super().dataReceived(data)
        finally:
            self._delivering = False
        if self._held:
            self._release()

    def write(self, data: bytes) -> None:
        if self.disconnecting and self._producer is None:
            return
        if data.__class__ is not bytes:
            data = memoryview(data).tobytes()  # TypeError for anything that is not a buffer
        if self._delivering:
            self._held.append(data)
        elif self._tlsConnection is None:
            # Before the ClientHello: held until the handshake ends, as
            # OpenSSL's WantReadError makes Twisted do; after the connection
            # was lost (Twisted forgets the OpenSSL connection then): dropped.
            if not self._lostTLSConnection:
                self._bufferedWrite(data)
        else:
            self._write(data)

    def _release(self) -> None:
        held, self._held = self._held, []
        self._write(held[0] if len(held) == 1 else b"".join(held))

    def _shutdownTLS(self) -> None:
        # close_notify goes after everything written before it.
        if self._held:
            self._release()
        if self._tlsConnection is not None:
            # (Without one there is no handshake to shut down: OpenSSL would
            # refuse, as it does in the middle of one, and Twisted does nothing.)
            super()._shutdownTLS()
        if self._peerGone and not self._lostTLSConnection:
            # The peer sent a FIN: no close_notify will answer ours.
            self.transport.loseConnection()
        elif self._closeNotifySent() and not self._lostTLSConnection and not self._finSent:
            # Our close_notify is out and the peer's has not come.  Twisted waits for it
            # with the connection open, so a client that waits for the end of the stream
            # (not of TLS) waited for the idle timeout: the FIN follows our close_notify
            # (as nginx closes), and the peer's close_notify or FIN ends the connection.
            self._finSent = True
            closeWriting(self.transport)

    def abortConnection(self) -> None:
        # Nothing more leaves: Twisted's abort discards what its transport
        # holds, close_notify included, so that is where it must go.
        self._held = []
        self._direct = False
        super().abortConnection()

    def _halfClose(self) -> bool:
        """
        The peer sent close_notify: end the wrapped protocol's input if it can
        half-close; whether it could.  Not once we are closing: then this is
        the reply to our own close_notify, and the connection ends, as in Twisted.
        """
        if self.disconnecting or not IHalfCloseableProtocol.implementedBy(
            type(self.wrappedProtocol)
        ):
            return False
        if not self._inputEnded:
            self._inputEnded = True
            if not self._aborted:
                cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()
        return True

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._hello is not None and self._tlsConnection is None and not self._lostTLSConnection:
            self._startTLSNow()  # OpenSSL says what the bytes were worth
        connection = self._tlsConnection
        if connection is None and not self._lostTLSConnection:
            # Lost before the client sent anything: what Twisted does when
            # OpenSSL reports a stream that ends before its ClientHello.
            if self._reason is None:
                self._reason = Failure(CONNECTION_LOST)
            self._lostTLSConnection = True
            self.transport.loseConnection()
        super().connectionLost(reason)  # frees the OpenSSL connection
        if connection is not None:
            self.heap.closed(self.factory._clock)

    def getPeerCertificate(self) -> Any:
        return None if self._tlsConnection is None else super().getPeerCertificate()

    def readConnectionLost(self) -> None:
        # The peer's FIN.
        if self._tlsConnection is None:
            # Before the ClientHello is whole: OpenSSL answers it (an alert), as in Twisted.
            self._startTLSNow()
        if self._inputEnded or self._lostTLSConnection:
            self._peerGone = True
            return
        if self._closeNotifySent():
            # The peer closed after our close_notify, without one of its own (as most
            # clients do, Python's ssl among them): it had everything; a clean end.
            self._tlsShutdownFinished(None)
            return
        if (
            self._handshakeDone
            and not self.disconnecting
            and IHalfCloseableProtocol.implementedBy(type(self.wrappedProtocol))
        ):
            # A FIN without close_notify (ncat, many scripts): the end of
            # input too, as over TCP, once the handshake is done.
            self._inputEnded = self._peerGone = True
            cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()
            return
        self._tlsConnection.bio_shutdown()
        self._flushReceiveBIO()
        if (
            not self._inputEnded and not self._lostTLSConnection
        ):  # pragma: no cover - OpenSSL always errs on a cut stream
            self._tlsShutdownFinished(None)

    def writeConnectionLost(self) -> None:
        pass

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, but it stops when nothing is left to decrypt rather
        # than asking OpenSSL once more and catching WantReadError.  Nothing
        # is left when the incoming BIO is empty and the last read did not
        # fill the buffer: with read-ahead off (OpenSSL's default, and
        # pyOpenSSL cannot turn it on) OpenSSL takes one record at a time out
        # of the BIO, and SSL_read returns what is left of the current record
        # up to the buffer's size.
        connection = self._tlsConnection
        incoming = _sizeOf(connection, "_into_ssl")
        while not self._lostTLSConnection:
            try:
                data = connection.recv(_READ)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._halfClose():
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                if len(data) < _READ and incoming() == 0:
                    break
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        if connection is None:
            return
        outgoing = _sizeOf(connection, "_from_ssl")
        while outgoing():
            try:
                data = connection.bio_read(65536)
            except WantReadError:
                return
            if self._direct:
                writeDirectly(self.transport, data)
            else:
                self.transport.write(data)


#: A fatal protocol_version alert, in a TLS 1.0 record (the version a first record carries).
NOT_TLS_ALERT = b"\x15\x03\x01\x00\x02\x02\x46"


class ClientHello:
    """
    A client's first bytes, read as they come: whether they may still be the
    start of a TLS ClientHello that is not whole yet.  That is: handshake
    records (type 22, version 3.x, at most 2**14 bytes) whose contents begin
    with a handshake message of type 1, and at most L{HOLD} bytes in all.
    Each byte is looked at once, however the bytes are cut.
    """

    __slots__ = ("data", "_record", "_seen", "_head", "_body")

    #: Bytes held at most: a record of 16 KiB.  Browsers' ClientHellos, with
    #: a post-quantum key share, take under 2 KiB; a longer one goes to
    #: OpenSSL, which holds it as it did.
    HOLD = 5 + 2**14

    def __init__(self) -> None:
        self.data = bytearray()
        self._record = 0  # where the record being read starts
        self._seen = 0  # bytes of its contents read
        self._head = b""  # the handshake message's first 4 bytes: type and length
        self._body = 0  # bytes of the handshake message read

    def add(self, data: bytes) -> bool:
        """Add what came; whether to wait for more (False: give it all to OpenSSL)."""
        buffer = self.data
        buffer += data
        if len(buffer) > self.HOLD:
            return False
        while True:
            at = self._record
            header = bytes(buffer[at : at + 5])
            if header[:1] not in (b"", b"\x16") or header[1:2] not in (b"", b"\x03"):
                return False
            if len(header) < 5:
                return True
            length = int.from_bytes(header[3:5], "big")
            if length > 2**14:
                return False
            start = at + 5 + self._seen
            piece = bytes(buffer[start : min(at + 5 + length, len(buffer))])
            self._seen += len(piece)
            self._body += len(piece)
            if len(self._head) < 4:
                self._head += piece[: 4 - len(self._head)]
                if self._head[:1] not in (b"", b"\x01"):
                    return False
            if len(self._head) == 4 and self._body >= 4 + int.from_bytes(self._head[1:4], "big"):
                return False  # whole
            if self._seen < length:
                return True
            self._record, self._seen = at + 5 + length, 0


def useDirectTLS(port: Any) -> bool:
    """
    Make the TLS factory beneath a listening port's factories (C{ssl:},
    C{tls:}, C{mtls:}, C{proxy:ssl:}, ...) build L{DirectTLSProtocol}s, if it
    builds Twisted's default ones.  True if it did.
    """
    factory = getattr(port, "factory", None)
    while factory is not None:
        if isinstance(factory, TLSMemoryBIOFactory):
            if factory.protocol is BufferingTLSTransport:
                factory.protocol = DirectTLSProtocol
                return True
            return False
        factory = getattr(factory, "wrappedFactory", None)
    return False
