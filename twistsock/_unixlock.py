"""
UNIX socket paths and their lock files, beneath twistsock's own UNIX ports.

Twisted's C{unix:PATH} endpoint (C{lockfile=1}, the default) keeps a lock
C{PATH.lock}: a symlink naming the PID of the process that listens
(L{twisted.python.lockfile.FilesystemLock}).  It judges a lock stale only by
that PID being dead, so a container restarted with the same PID (PID 1, say)
finds its own old lock "alive" and cannot start, every time.  Here a lock
that names a live process is stale when nothing answers on PATH.

Ports adopted from a C{--workers} master are the master's: closing one in a
worker leaves the path, its mode and its lock alone (Twisted's adopted UNIX
port would unlink the path, and so make the master's own close fail before
it releases the lock; and it would reset the path's mode to 0666).

Twisted's classes are left as they are: only the endpoints twistsock builds
(L{twistsock.endpoints.serverFromString}) and the ports its workers adopt
use what is here.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from twisted.internet import defer, endpoints, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer


class InUse(OSError):
    """The lock's process answers on the path: another server is listening there."""


def reclaimStale(path: str) -> None:
    """
    Before listening on C{path} with a lock: if C{path.lock} names a live
    process but nothing answers on C{path}, remove the lock and the
    leftover socket, so that Twisted's lock and bind succeed.  A lock
    naming a dead process is left to Twisted, which reclaims it itself.

    @raise InUse: something answers on C{path}; the message names the path
        and the PID.
    """
    lock = path + ".lock"
    try:
        pid = os.readlink(lock)
    except OSError:
        return  # no lock (or not a symlink): Twisted decides
    if _dead(pid):
        return
    if _answers(path):
        raise InUse(
            errno.EADDRINUSE, f"{path} is in use: pid {pid} holds {lock} and the socket answers"
        )
    try:
        if os.readlink(lock) != pid:
            # Another server starting at the same time took it: its socket is
            # not ours to remove.
            return
        os.unlink(lock)
    except FileNotFoundError:
        return  # likewise
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _dead(pid: str) -> bool:
    """Whether the process a lock names is certainly gone (only then may a PID alone decide)."""
    try:
        number = int(pid)
        if number > 0:  # kill(0) and kill(-N) would ask about process groups
            os.kill(number, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):  # not a PID; someone else's process
        pass
    return False


def _answers(path: str) -> bool:
    """Whether a server listens on the UNIX socket C{path}: a connection is accepted (or queued)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True  # a listener whose backlog is full
    finally:
        probe.close()
    return True


@implementer(IStreamServerEndpoint)
class ReclaimingUNIXEndpoint:
    """
    Twisted's C{unix:} server endpoint, with L{reclaimStale} before it
    listens with a lock.

    A reactor with a true C{adopting} attribute (a C{--workers} worker's)
    binds nothing: it adopts the master's socket, lock and all, so there is
    nothing to reclaim.
    """

    def __init__(self, endpoint: endpoints.UNIXServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        endpoint = self._endpoint
        path = os.fsdecode(endpoint._address)
        if (
            endpoint._wantPID
            and path[:1] not in ("", "\0")
            and not getattr(endpoint._reactor, "adopting", False)
        ):
            try:
                reclaimStale(path)
            except OSError as e:
                return defer.fail(CannotListenError(None, path, e))
        return endpoint.listen(factory)


class AdoptedUNIXPort(unix.Port):
    """
    A UNIX port on a listening socket another process bound: closing it
    closes the socket and leaves the path (and its lock) to their owner.
    """

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def adoptUNIXPort(reactor: Any, fd: int, factory: IProtocolFactory) -> AdoptedUNIXPort:
    """
    C{reactor.adoptStreamPort(fd, AF_UNIX, factory)}, with an
    L{AdoptedUNIXPort}; the path keeps the mode its owner gave it.  The
    caller still closes C{fd}.
    """
    port = AdoptedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
    # Twisted 26.10 keeps the path in _bindPath; 26.4 in tcp.Port's port attribute.
    path = getattr(port, "_bindPath", None) or port.port
    if path[:1] not in (b"\0", "\0"):
        # Twisted chmods an adopted socket's path to the port's mode (0666 by default).
        port.mode = stat.S_IMODE(os.stat(path).st_mode)
    port.startListening()
    return port
