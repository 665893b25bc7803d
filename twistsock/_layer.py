"""
A protocol that sits between a transport and another protocol, and is that
protocol's transport.
"""

from __future__ import annotations

from typing import Any, TypeGuard, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._direct import canWriteDirectly, loseDirectly, writeDirectly
from ._tcp import Server as FastServer
from ._types import IStreamTransport


@implementer(IHalfCloseableProtocol)
class Layer(Protocol):
    """
    Pass everything through, both ways: events from the transport to
    C{wrapped}, and C{wrapped}'s calls on its transport to ours (the rest of
    the transport's interface by name: L{PASSED_THROUGH}).  Subclasses
    override what they add.  Half-close passes through; a wrapped protocol
    that cannot half-close gets a full close once its output is sent.
    """

    #: Whether our transport is a Twisted socket transport that we may send on directly.
    _direct = False

    #: The transport below, from makeConnection on.
    transport: IStreamTransport

    def __init__(self, wrapped: IProtocol) -> None:
        self.wrapped = wrapped

    # -- events from the transport below --

    def makeConnection(self, transport: Any) -> None:
        self._direct = transport.__class__ is FastServer or canWriteDirectly(transport)
        # Protocol.makeConnection, whose connectionMade a Layer does not have.
        self.connected = 1
        self.transport = transport
        # We are the wrapped protocol's transport, but do not declare
        # ITransport: Twisted's TLS protocol copies its transport's declared
        # interfaces onto itself (see _halfCloseable), and more of them would
        # change which one it keeps.
        self.wrapped.makeConnection(self)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def readConnectionLost(self) -> None:
        if _halfCloseable(self.wrapped):
            self.wrapped.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if _halfCloseable(self.wrapped):
            self.wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.wrapped.connectionLost(reason)

    # -- the transport, as the protocol above sees it --

    def write(self, data: bytes) -> None:
        if self._direct:
            writeDirectly(self.transport, data, self)
        else:
            self.transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._producerNow()
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        if self._direct:
            loseDirectly(self.transport)
        else:
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def closeWriting(self) -> bool:
        """
        Send what is buffered, then shut down the sending side, if the
        transport beneath the layers is a socket (TLS cannot close one side
        of its stream); whether it will.
        """
        return closeWriting(self.transport)

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    #: The protocol above made us (its transport) our own streaming producer,
    #: and the transport beneath has not been told yet (see L{registerProducer}).
    _selfProducing = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if producer is self and streaming and self._direct:
            # Only a transport holding output ever pauses its producer, and
            # ours holds output only from a write the kernel did not take
            # whole: it is told then (L{_producerNow}), before that write.
            # A connection answered in one send never registers at all.
            self._selfProducing = True
            return
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._selfProducing:
            self._selfProducing = False
            return
        self.transport.unregisterProducer()

    def _producerNow(self) -> None:
        """The transport is about to hold output: give it its producer if it has none yet."""
        if self._selfProducing:
            self._selfProducing = False
            self.transport.registerProducer(cast(IPushProducer, self), True)

    # A protocol may register its transport as its own producer: that is us.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


#: The rest of the transport beneath, passed through unchanged: what Twisted's
#: TCP and TLS transports declare beyond what L{Layer} defines (ITCPTransport,
#: ISSLTransport, ISystemHandle, INegotiated; tests/test_layer.py keeps the
#: list complete), and C{disconnecting}.  Named, not a C{__getattr__}: CPython
#: 3.11 cannot specialize any attribute access on a class that has one, and a
#: connection reads its layers' attributes on every message (1 KiB echo was 5%
#: slower with it: 166,800 against 175,700 req/s).
PASSED_THROUGH = (
    "disconnecting",
    "getHandle",
    "getPeerCertificate",
    "getTcpKeepAlive",
    "getTcpNoDelay",
    "loseWriteConnection",
    "negotiatedProtocol",
    "setTcpKeepAlive",
    "setTcpNoDelay",
)


def _passedThrough(name: str) -> property:
    def get(self: Layer) -> Any:
        return getattr(self.transport, name)

    get.__name__ = name
    return property(get, doc=f"The transport's C{{{name}}}.")


for _name in PASSED_THROUGH:
    setattr(Layer, _name, _passedThrough(_name))
del _name


def closeWriting(transport: Any) -> bool:
    """
    Send what C{transport} holds, then shut down its sending side, if it is
    a socket, or a L{Layer} over one; whether it will.
    """
    socket = transport
    while isinstance(socket, Layer):
        socket = socket.transport
    if not isinstance(socket, FileDescriptor) or not socket.connected or socket.disconnecting:
        return False
    transport.loseWriteConnection()
    return True


def _halfCloseable(protocol: IProtocol) -> TypeGuard[IHalfCloseableProtocol]:
    """
    Whether a protocol's class handles half-close.  Not C{providedBy}: a TLS
    protocol copies its transport's interfaces onto itself, so above a Layer
    it claims IHalfCloseableProtocol and its readConnectionLost would come
    straight back to us.
    """
    return IHalfCloseableProtocol.implementedBy(type(protocol))
