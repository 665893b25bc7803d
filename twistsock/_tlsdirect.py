"""
Twisted's TLS layer with replies that leave without waiting for the reactor:
L{DirectTLSProtocol}, set on every TLS port twistsock listens on by
L{useDirectTLS}.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ._direct import canWriteDirectly, writeDirectly


try:  # pyOpenSSL's own bindings: how many bytes a memory BIO holds (pyOpenSSL's crypto module uses it too)
    from OpenSSL.SSL import _ffi, _lib

    _memoryBIOSize = _lib.BIO_get_mem_data
    _NULL = _ffi.NULL
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _memoryBIOSize = None


#: Bytes asked of SSL_read at a time: more than a TLS record holds (16 KiB).
_READ = 2**15


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
    connection, as in Twisted.
    """

    _inputEnded = False
    _peerGone = False

    _direct = False
    _delivering = False
    _held: list[bytes]

    def makeConnection(self, transport: Any) -> None:
        self._direct = canWriteDirectly(transport)
        self._held = []
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
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
        else:
            self._write(data)

    def _release(self) -> None:
        held, self._held = self._held, []
        self._write(held[0] if len(held) == 1 else b"".join(held))

    def _shutdownTLS(self) -> None:
        # close_notify goes after everything written before it.
        if self._held:
            self._release()
        super()._shutdownTLS()
        if self._peerGone and not self._lostTLSConnection:
            # The peer sent a FIN: no close_notify will answer ours.
            self.transport.loseConnection()

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
        if self.disconnecting or not IHalfCloseableProtocol.implementedBy(type(self.wrappedProtocol)):
            return False
        if not self._inputEnded:
            self._inputEnded = True
            if not self._aborted:
                self.wrappedProtocol.readConnectionLost()
        return True

    def readConnectionLost(self) -> None:
        # The peer's FIN.
        if self._inputEnded or self._lostTLSConnection:
            self._peerGone = True
            return
        if self._handshakeDone and not self.disconnecting and IHalfCloseableProtocol.implementedBy(type(self.wrappedProtocol)):
            # A FIN without close_notify (ncat, many scripts): the end of
            # input too, as over TCP, once the handshake is done.
            self._inputEnded = self._peerGone = True
            self.wrappedProtocol.readConnectionLost()
            return
        self._tlsConnection.bio_shutdown()
        self._flushReceiveBIO()
        if not self._inputEnded and not self._lostTLSConnection:  # pragma: no cover - OpenSSL always errs on a cut stream
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
