"""
Twisted's TCP listening port and server transport, cheaper per connection.

A short connection (connect, one line, a reply, close) costs a plain Twisted
server about 32 us of CPU, and most of it is the transport's own
bookkeeping rather than the system calls: a log prefix and a C{repr} string
formatted for every connection, a context manager and a generator around
every C{accept}, and two C{epoll_ctl} calls (register, unregister) for a
socket whose first read could have been made at once.

This port and transport are Twisted's (C{tcp.Port}, C{tcp.Server}: same
producer, buffering, half-close, TLS and error handling), with three
changes:

 - B{The first read is made at accept.}  Every service twistsock serves is
   one where the client speaks first, and by the time a connection is
   accepted its first bytes have usually arrived.  The port reads them right
   after the protocol's C{connectionMade}; the socket is registered with the
   reactor only if the connection is still open and wants to read after that.
   A connection answered and closed in that first read never touches epoll.
 - B{The log prefix and C{repr} are made when asked for}, not per
   connection.
 - B{The accept loop} calls the socket's C{accept} directly, and gives any
   error but "nothing waiting" to Twisted's own loop, which handles running
   out of descriptors as it always has.

The reactor also closes a connection answered in its first read right
after it, before the port accepts the next (see
L{twistsock.reactor.TwistsockReactor.closeSoon}).

Only L{twistsock.reactor.TwistsockReactor} uses them, for its C{listenTCP}
(every C{tcp:}, C{tcp6:}, C{ssl:}, C{tls:} and C{mtls:} endpoint) and its
C{adoptStreamPort} (C{--workers}, systemd); Twisted's classes are not
changed.
"""

from __future__ import annotations

import _socket
import socket
import struct
import sys
from typing import Any

from twisted.internet import address, error, main, tcp
from twisted.python import log
from twisted.python.failure import Failure

_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_RESET = struct.pack("ii", 1, 0)


class Server(tcp.Server):
    """C{tcp.Server}, started without a log prefix and read once at accept."""

    #: Before the port's first read: reading is only wished for, not registered.
    _pending = False
    #: Whether the protocol wants to be read (while C{_pending}).
    _wantRead = False
    _logstr: str | None = None
    _repstr: str | None = None
    #: The peer's address, made once (the port's, given to the factory too).
    _peer: Any = None

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        # tcp.Server.__init__ and what it calls (Connection, FileDescriptor),
        # less the log prefix and repr, and less startReading when the port
        # reads first.
        self.reactor = reactor
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.socket = sock
        sock.setblocking(False)
        self.fileno = sock.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.connected = 1
        if server is not None and server._readsFirst:
            self._pending = self._wantRead = True
        else:
            self.startReading()

    # The log prefix and repr, made when asked for.

    @property
    def logstr(self) -> str:
        if self._logstr is None:
            protocol = getattr(self, "protocol", None)
            prefix = self._getLogPrefix(protocol) if protocol is not None else "-"
            self._logstr = f"{prefix},{self.sessionno},{self.hostname}"
        return self._logstr

    @logstr.setter
    def logstr(self, value: str) -> None:
        self._logstr = value

    @property
    def repstr(self) -> str:
        if self._repstr is None:
            protocol = getattr(self, "protocol", None)
            number = self.server._realPortNumber if self.server is not None else "?"
            self._repstr = f"<{type(protocol).__name__} #{self.sessionno} on {number}>"
        return self._repstr

    @repstr.setter
    def repstr(self, value: str) -> None:
        self._repstr = value

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            client: tuple[Any, ...] = self.client
            peer = self._peer = self._addressType("TCP", *client)
        return peer

    def connectionLost(self, reason: Failure) -> None:
        # tcp.Connection.connectionLost and FileDescriptor.connectionLost, with
        # isinstance where they call Failure.check (which walks the class's
        # bases by name).
        if "socket" not in self.__dict__:
            return  # called twice (an abort, then an error reaching the reactor)
        self.disconnected = 1
        self.connected = 0
        if self.producer is not None:
            self.producer.stopProducing()
            self.producer = None
        self.stopReading()
        self.stopWriting()
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)

    def _closeSocket(self, orderly: bool) -> None:
        # _SocketCloser._closeSocket, closing the socket object without the
        # Python-level socket.close (no makefile() objects exist for it).
        skt = self.socket
        try:
            if orderly:
                skt.shutdown(socket.SHUT_RDWR)
            else:
                # SO_LINGER 1, 0: the close sends a reset (an abort).
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        skt._closed = True  # type: ignore[attr-defined]
        try:
            _socket.socket.close(skt)
        except OSError:
            pass

    def doRead(self) -> Any:
        # tcp.Connection.doRead and _dataReceived, in one call.
        try:
            data = self.socket.recv(self.bufferSize)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    # Until the first read, reading is only wished for; a socket never
    # registered with the reactor is not unregistered either.

    #: Whether this socket was ever registered with the reactor.
    _registered = False

    def startReading(self) -> None:
        if self._pending:
            self._wantRead = True
        else:
            self._registered = True
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        if self._pending:
            self._wantRead = False
        elif self._registered:
            self.reactor.removeReader(self)

    def startWriting(self) -> None:
        self._registered = True
        self.reactor.addWriter(self)

    def stopWriting(self) -> None:
        if self._registered:
            self.reactor.removeWriter(self)

    def firstRead(self) -> None:
        """
        Read what has arrived already, if the protocol wants it; then register
        with the reactor if it still wants to read.
        """
        why = None
        if self._wantRead and self.connected:
            try:
                why = self.doRead()
            except BaseException:
                why = sys.exc_info()[1]
                log.err(system=self.logstr)
        self._pending = False
        if why:
            reactor: Any = self.reactor  # a posixbase reactor, as every TCP transport's
            reactor._disconnectSelectable(self, why, True)
        elif self._wantRead and self.connected and not self.disconnecting:
            self.startReading()


class Port(tcp.Port):
    """C{tcp.Port}, making L{Server} transports and reading each once at accept."""

    transport = Server
    #: Whether the connections being made are read by the port first.
    _readsFirst = False

    def doRead(self) -> None:
        sock: Any = self.socket
        accept = sock._accept  # accept(), less the socket object it makes
        family, kind, proto = sock.family, sock.type, sock.proto
        factory: Any = self.factory
        reactor: Any = self.reactor
        build = self._buildAddr
        # The twistsock reactor's transports waiting to be closed (see closeSoon).
        closing = getattr(reactor, "_closing", None)
        accepted = 0
        limit = self.numberAccepts
        try:
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    # Out of descriptors, or a connection gone before its accept:
                    # Twisted's loop knows what to do (a reserved descriptor, its logs).
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.socket(family, kind, proto, fileno=fd)
                if len(addr) == 4:
                    # IPv6: keep the scope ID, as Twisted's port does.
                    host = socket.getnameinfo(addr, _NUMERIC)
                    addr = (host[0], *addr[1:])
                peer = build(addr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                self._readsFirst = True
                try:
                    transport = Server(skt, protocol, addr, self, s, reactor)
                finally:
                    self._readsFirst = False
                transport._peer = peer
                protocol.makeConnection(transport)
                transport.firstRead()
                if closing:
                    # Answered and closed in its first read: closed now, outside its
                    # protocol's stack, not after every other connection of this pass.
                    reactor.closeWaiting()
        except BaseException:
            log.deferr()
        # Twisted's scaling of the accept loop.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)
