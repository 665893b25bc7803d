"""
Twisted's epoll reactor without the per-event logging context.

For every ready socket, Twisted's reactor calls C{log.callWithLogger}, which
asks the socket's protocol for its log prefix and pushes a logging context
before it reads; on a loopback echo that is a fifth of the server's CPU per
message.  This reactor dispatches events exactly as L{EPollReactor} does
(same C{_doReadOrWrite}, same disconnection handling) and looks the log prefix
up only when there is an error to log.

What changes: legacy C{twisted.python.log.msg} calls made while handling a
socket event are logged with system C{-} instead of the protocol's prefix.
twistsock's own log lines (C{twisted.logger}) do not use that context.

Use it with C{twist --reactor=twistsock sockets ...}.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.python import log
from twisted.python.failure import Failure

from . import _tcp
from ._direct import holdsOutput

_NO_FILEDESC = error.ConnectionFdescWentAway("File descriptor lost")
_DONE = Failure(CONNECTION_DONE)
_READABLE = EPollReactor._POLL_IN
Server = _tcp.Server


class TwistsockReactor(EPollReactor):
    """L{EPollReactor}, dispatching each event without a logging context, and closing at once."""

    def __init__(self) -> None:
        # Transports told to close with nothing left to send: closed once the
        # event being handled is (the same list, always).
        self._closing: list[Any] = []
        super().__init__()

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> _tcp.Port:
        """Listen with twistsock's TCP port (L{twistsock._tcp}): Twisted's, made cheaper."""
        p = _tcp.Port(port, factory, backlog, interface, self)
        p.startListening()
        return p

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        """
        Adopt a listening socket (C{--workers}, systemd): a TCP one with
        twistsock's port, as L{listenTCP}; others as Twisted does.
        """
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        p = _tcp.Port._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p

    def closeSoon(self, transport: Any) -> None:
        """
        Close C{transport} (a Twisted socket transport that has stopped
        reading, marked disconnecting, with nothing buffered) as soon as the
        event being handled is (the read that answered it), as its C{doWrite}
        would on the next pass: never inside the caller's own stack, and
        without waiting to be writable.

        At once, not at the end of the pass: a pass can be long (a listening
        port accepts, reads and answers many connections in one), and
        sockets held open until its end are a FIN the client waits for and
        kernel work that piles up.  Closing right after each event took a
        one-line connection from 43 to 35 us of server CPU.
        """
        self._closing.append(transport)

    def closeWaiting(self) -> None:
        """Close the transports L{closeSoon} was given (by a caller outside their stacks)."""
        waiting = self._closing[:]
        self._closing.clear()
        for t in waiting:
            if not t.connected or getattr(t, "_aborting", False):
                continue  # lost another way meanwhile (reset), or being aborted
            if holdsOutput(t):
                # Written to, or given a producer, since: Twisted closes it after sending.
                t.startWriting()
                continue
            try:
                if t.__class__ is _tcp.Server:
                    t.connectionLost(_DONE)  # which stops reading and writing itself
                else:
                    self._disconnectSelectable(t, CONNECTION_DONE, False)
            except BaseException:
                log.err(system=_prefix(t))

    def doPoll(self, timeout: float | None) -> None:
        closing = self._closing
        if closing:
            self.closeWaiting()  # asked for outside any event (a timer, a Deferred)
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        get = self._selectables.get
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = get(fd)
            if selectable is None:
                continue
            if event == _READABLE:
                # Readable and nothing else, the usual event: _doReadOrWrite's
                # steps for it, without the call.
                inRead = True
                why: BaseException | None
                try:
                    if selectable.fileno() == -1:
                        why, inRead = _NO_FILEDESC, False
                    elif selectable.__class__ is Server:
                        # Server.doRead inline: the read every message of a connection makes.
                        why = None
                        try:
                            data = selectable.socket.recv(selectable.bufferSize)
                        except BlockingIOError:
                            pass
                        except OSError:
                            why = CONNECTION_LOST
                        else:
                            if data:
                                selectable.protocol.dataReceived(data)
                            else:
                                why = CONNECTION_DONE
                    else:
                        why = selectable.doRead()
                except BaseException:
                    why, inRead = sys.exc_info()[1], False
                    log.err(system=_prefix(selectable))
                if why:
                    try:
                        self._disconnectSelectable(selectable, why, inRead)
                    except BaseException:
                        log.err(system=_prefix(selectable))
            else:
                try:
                    dispatch(selectable, fd, event)
                except BaseException:
                    log.err(system=_prefix(selectable))
            if closing:
                self.closeWaiting()

    doIteration = doPoll

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        # posixbase._PollLikeMixin._doReadOrWrite, logging with the selectable's prefix.
        why: BaseException | None = None
        inRead = False
        if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):
            # Hung up with nothing left to read: a clean close if we were reading.
            if fd in self._reads:
                inRead = True
                why = CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & self._POLL_IN:
                        why = selectable.doRead()
                        inRead = True
                    if not why and event & self._POLL_OUT:
                        why = selectable.doWrite()
                        inRead = False
            except BaseException:
                why = sys.exc_info()[1]
                log.err(system=_prefix(selectable))
        if why:
            self._disconnectSelectable(selectable, why, inRead)


def _prefix(selectable: Any) -> str:
    try:
        return selectable.logPrefix()
    except BaseException:
        return "(buggy logPrefix method)"


def install() -> None:
    """Install L{TwistsockReactor} as the global reactor."""
    installReactor(TwistsockReactor())
