"""
Send at once when nothing waits to be sent; close at once when nothing does.

Twisted's C{transport.write} only buffers: it registers the socket for
writability and sends on the next pass of the reactor, which costs two
C{epoll_ctl} calls and one reactor pass per reply (Twisted issue 5303).  When
the transport's buffer is empty, sending straight away gives the same bytes in
the same order; whatever the kernel does not take goes to C{transport.write},
and from then on every write does until Twisted has sent it all.  Producers,
backpressure, closing and errors stay Twisted's: the fast path only ever
applies to a transport with nothing buffered, which Twisted's own
C{doWrite} would have sent the same way.

It reads attributes of Twisted's socket transports (C{dataBuffer},
C{offset}, C{_tempDataLen}, C{_writeDisconnecting}, C{socket}, ...);
L{canWriteDirectly} checks that they are there and that C{write} is still
Twisted's buffering one, and falls back to plain C{transport.write}
otherwise, so a Twisted that changes them is slower, not wrong.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp

_ATTRIBUTES = (
    "socket",
    "dataBuffer",
    "offset",
    "_tempDataLen",
    "_writeDisconnecting",
    "disconnecting",
    "connected",
    "TLS",
    "producer",
    "reactor",
)
# Classes whose write is Twisted's buffering one, unchanged.
_PLAIN_WRITES = (abstract.FileDescriptor.write, getattr(tcp.Connection, "write", None))


def writeDirectly(transport: Any, data: bytes, layer: Any = None) -> None:
    """
    Write C{data} to C{transport} (one that L{canWriteDirectly}): send at
    once if nothing is buffered, and give Twisted whatever is not sent
    (telling C{layer}, a L{twistsock._layer.Layer} above, first).
    """
    t = transport
    # Nothing buffered: Twisted's doWrite empties dataBuffer once it is all sent.
    if (
        t._tempDataLen
        or t.dataBuffer
        or not t.connected
        or t.disconnecting
        or t._writeDisconnecting
        or t.TLS
        or data.__class__ is not bytes
        or not data
    ):
        if layer is not None:
            layer._producerNow()
        t.write(data)
        return
    try:
        sent = t.socket.send(data)
    except OSError:
        # Would block, interrupted, or an error: Twisted buffers it all, and
        # its doWrite retries, or meets the error and closes the connection
        # as it would have.
        sent = 0
    if sent != len(data):
        if layer is not None:
            layer._producerNow()
        t.write(data[sent:])


def loseDirectly(transport: Any) -> None:
    """
    Close C{transport} (one that L{canWriteDirectly}) once what it holds is
    sent: at the end of this reactor pass when nothing is buffered and the
    reactor offers it (L{twistsock.reactor.TwistsockReactor.closeSoon}),
    else as Twisted does.

    Twisted's C{loseConnection} always waits for the socket to be writable,
    even with nothing to send: two C{epoll_ctl}, one more reactor pass, and an
    empty C{send} before the close (a tenth of a one-line connection).
    """
    t = transport
    closeSoon = getattr(t.reactor, "closeSoon", None)
    if (
        closeSoon is None
        or holdsOutput(t)
        or not t.connected
        or t.disconnecting
        or t._writeDisconnecting
        or t.TLS
    ):
        t.loseConnection()
        return
    t.stopReading()
    t.disconnecting = 1
    closeSoon(t)


def holdsOutput(transport: Any) -> bool:
    """Whether a Twisted socket transport still has bytes to send, or a producer to wait for."""
    t = transport
    return bool(t._tempDataLen or t.offset != len(t.dataBuffer) or t.producer is not None)


def canWriteDirectly(transport: Any) -> bool:
    """
    Whether L{writeDirectly} may be used for C{transport}: a Twisted socket
    transport with Twisted's own write.
    """
    if getattr(transport.write, "__func__", None) not in _PLAIN_WRITES:
        return False  # not Twisted's buffering write (another transport, or replaced on this one)
    kind = type(transport)
    known = _CAPABLE.get(kind)
    if known is None:
        known = _CAPABLE[kind] = issubclass(kind, tcp.Connection) and all(
            hasattr(transport, name) for name in _ATTRIBUTES
        )
    return known


# Per transport class: whether it is a Twisted socket transport with every
# attribute the fast path reads.
_CAPABLE: dict[type, bool] = {}
