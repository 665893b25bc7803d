"""
C{--workers N}: the classic concurrent (master/slave) server, the Twisted way.

The master listens on every stream endpoint as usual, but never accepts on
those sockets: it hands them to N worker processes, each a C{twist sockets}
that adopts them (C{reactor.adoptStreamPort}) and serves, so that all the
machine's cores serve and the kernel spreads the connections.  The master
restarts a worker that dies, and on SIGTERM closes its sockets and has every
worker close its own and drain before it exits: new clients are refused at
once, by every process.  A worker never outlives its master: on Linux the
kernel kills it when the master ends, however it ends (L{dieWithMaster}).

Adopting works for every stream endpoint, TLS and PROXY included: the worker
parses the same endpoint string with a reactor whose C{listenTCP},
C{listenSSL} and C{listenUNIX} adopt the inherited socket instead of binding
a new one.

UDP is served by the master alone, so that the per-source rate limit and the
counts stay exact (a datagram socket shared by N processes would let each
source through N times over).  The master also serves C{--metrics}, adding up
the tallies each worker sends it every second over a pipe.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, protocol, tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from ._unixlock import adoptUNIXPort
from .listen import ListeningService, SocketsService
from .metrics import Tallies, add

#: The first file descriptor a worker's inherited sockets take.
FIRST_FD = 3
#: Seconds between a worker's tally reports.
REPORT_INTERVAL = 1.0
#: The longest wait before restarting a worker that keeps dying.
MAX_BACKOFF = 30.0
#: The environment variable that tells a worker its master's PID.
MASTER_PID = "TWISTSOCK_MASTER_PID"
#: The environment variable that makes C{twist sockets} a worker: C{INDEX:FD/FAMILY,...:REPORTFD}
#: (not an option, so that C{--help} shows users only theirs).
WORKER = "TWISTSOCK_WORKER"
#: The signal the kernel sends a worker when its master ends (see L{dieWithMaster}).
MASTER_DEATH_SIGNAL = signal.SIGKILL


class AdoptingReactor:
    """
    A reactor whose listen calls adopt one inherited listening socket.

    The port works on a copy of the descriptor; the inherited one is closed
    once adopted, so that closing the port (at drain) closes the socket in
    this process.  A UNIX port leaves the path to the master (L{adoptUNIXPort}).
    """

    #: It binds nothing, so there is no stale UNIX lock to reclaim (L{twistsock._unixlock}).
    adopting = True

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self.fd = fd
        self.family = family

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _adopt(self, factory: Any, closeInherited: bool = True) -> Any:
        if self.family == socket.AF_UNIX:
            port = adoptUNIXPort(self._reactor, self.fd, factory)
        else:
            port = self._reactor.adoptStreamPort(self.fd, self.family, factory)
        if closeInherited:
            os.close(self.fd)
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        return self._adopt(factory)

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        # The caller closes its fileDescriptor (IReactorSocket's contract): if
        # it is ours, once is enough.
        return self._adopt(factory, closeInherited=fileDescriptor != self.fd)


def familyOf(address: object) -> int:
    """The socket family of a listening port's address."""
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot hand {address} to workers")


class HeldPort(ListeningService):
    """Listen, then stop reading at once: the socket is only held for the workers."""

    #: A stream socket's port, which the workers get by its descriptor:
    #: Twisted's tcp.Port (UNIX, TLS and adopted ports are ones too).
    port: tcp.Port | None

    def privilegedStartService(self) -> None:
        starting = self._listening is None
        super().privilegedStartService()
        if starting and self._listening is not None:
            self._listening.addCallback(self._hold)

    def _hold(self, port: Any) -> Any:
        if port is not None:
            port.stopReading()
        return port


class _Worker(protocol.ProcessProtocol):
    """One worker process, as the master sees it: exits, and tally reports."""

    #: Set by the master as it spawns the process.
    started: float
    pid: int

    def __init__(self, master: MasterService, index: int) -> None:
        self.master = master
        self.index = index
        self.tallies: Tallies = {}
        self._buffer = b""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line:
                self.tallies = json.loads(line)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.master.workerEnded(self, reason.value)


class MasterService(SocketsService):
    """
    The master of C{--workers N}: holds the stream sockets, serves UDP and
    the metrics itself, and keeps N workers running.
    """

    log = Logger()

    def __init__(self, workers: int, workerArgv: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = workers
        self.workerArgv = workerArgv
        self.workers: dict[int, _Worker] = {}
        self.processes: dict[int, Any] = {}
        #: The last tallies of workers that have ended (counters only keep counting).
        self.retired: Tallies = {}
        self._backoff: dict[int, float] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _ready(self) -> None:
        self.catchSignals()
        self.log.info(
            "ready: {count} listening, {workers} workers ({reactor})",
            count=len([c for c in self if c is not self.metrics]),
            workers=self.count,
            reactor=type(self.reactor).__name__,
        )

    def hangup(self) -> None:
        """SIGHUP: the workers reopen their log files too."""
        super().hangup()
        for index, worker in self.workers.items():
            # Only workers that have reported: a worker still starting has no
            # handler yet, and SIGHUP's default would end it.
            if not worker.ended.called and worker.tallies:
                self._signal(index, signal.SIGHUP)

    def heldSockets(self) -> list[tuple[int, int]]:
        """The (fd, family) of every held stream socket, in --listen order."""
        held = []
        for child in self:
            if isinstance(child, HeldPort) and child.port is not None:
                held.append((child.port.fileno(), familyOf(child.port.getHost())))
        return held

    def _spawn(self, index: int) -> None:
        held = self.heldSockets()
        report = FIRST_FD + len(held)
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2, report: "r"}
        for offset, (fd, _) in enumerate(held):
            childFDs[FIRST_FD + offset] = fd
        sockets = ",".join(
            f"{FIRST_FD + offset}/{family}" for offset, (_, family) in enumerate(held)
        )
        argv = list(self.workerArgv)
        worker = _Worker(self, index)
        self.workers[index] = worker
        env = {**os.environ, MASTER_PID: str(os.getpid()), WORKER: f"{index}:{sockets}:{report}"}
        process = self.reactor.spawnProcess(
            worker, sys.executable, argv, env=env, childFDs=childFDs
        )
        self.processes[index] = process
        worker.started = self.reactor.seconds()
        worker.pid = process.pid
        self.log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def workerEnded(self, worker: _Worker, status: Any) -> None:
        self.retired = add(
            self.retired, {k: v for k, v in worker.tallies.items() if k != "connections_active"}
        )
        self.log.info(
            "worker {index} (pid {pid}) ended: {status}",
            index=worker.index,
            pid=worker.pid,
            status=_status(status),
        )
        if self._stopping or not self.running:
            return
        # A worker that died young waits longer each time, up to MAX_BACKOFF.
        lived = self.reactor.seconds() - worker.started
        backoff = (
            1.0
            if lived > MAX_BACKOFF
            else min(MAX_BACKOFF, self._backoff.get(worker.index, 0.5) * 2)
        )
        self._backoff[worker.index] = backoff
        self.log.info(
            "restarting worker {index} in {backoff:g} s", index=worker.index, backoff=backoff
        )
        self.reactor.callLater(backoff, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and not self._stopping:
            self._spawn(index)

    def tallies(self) -> Tallies:
        total = add(super().tallies(), self.retired)
        for worker in self.workers.values():
            if not worker.ended.called:
                total = add(total, worker.tallies)
        return total

    def healthy(self) -> bool:
        return super().healthy() and not self._stopping

    def stopService(self) -> defer.Deferred[None]:
        """
        Close every socket this process holds, then SIGTERM every worker
        (each closes its copies and drains) and wait for them; then stop as
        a single process does.  The kernel refuses new clients as soon as the
        last copy of a listening socket is closed, and a UNIX path is removed
        with the master's socket.
        """
        self._stopping = True
        ports = [child for child in self if child is not self.metrics and child.running]
        closed = defer.DeferredList([defer.maybeDeferred(child.stopService) for child in ports])
        return closed.addCallback(lambda _: self._stopWorkers())

    def _stopWorkers(self) -> defer.Deferred[None]:
        ends = []
        for index, worker in self.workers.items():
            if not worker.ended.called:
                self._signal(index, signal.SIGTERM)
                ends.append(worker.ended)
        if ends:
            self.log.info("waiting for {count} workers to drain", count=len(ends))
        # A worker that outlives its own drain deadline by 5 s is killed.
        killer = self.reactor.callLater(self.drainTimeout + 5, self._killAll)
        waited = defer.DeferredList(ends)

        def stopped(_: object) -> defer.Deferred[None]:
            if killer.active():
                killer.cancel()
            return super(MasterService, self).stopService()

        return waited.addCallback(stopped)

    def _signal(self, index: int, number: int) -> None:
        try:
            self.processes[index].signalProcess(number)
        except Exception:  # ProcessExitedAlready: it is gone already
            pass

    def _killAll(self) -> None:
        for index, worker in self.workers.items():
            if not worker.ended.called:
                self.log.info(
                    "worker {index} still running after the drain: killing it", index=index
                )
                self._signal(index, signal.SIGKILL)


def _status(ended: Any) -> str:
    """How a process ended, in words: C{exit status 1}, C{signal 9 (SIGKILL)}."""
    number = getattr(ended, "signal", None)
    if number:
        return f"signal {number} ({signal.Signals(number).name})"
    return f"exit status {getattr(ended, 'exitCode', 0) or 0}"


def workerArgv(pluginArgv: list[str]) -> list[str]:
    """
    The command line of a worker: this process's own `twist` options, then
    `sockets` and its options (the worker ignores --workers, --metrics and UDP).
    """
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    twistOptions = (
        sys.argv[1 : sys.argv.index("sockets")]
        if program == "twist" and "sockets" in sys.argv
        else ["--log-format=text"]
    )
    return [sys.executable, "-m", "twisted", *twistOptions, "sockets", *pluginArgv]


def parseWorker(text: str) -> tuple[int, list[tuple[int, int]], int]:
    """C{INDEX:FD/FAMILY,...:REPORTFD} (what the master passes in L{WORKER})."""
    index, sockets, report = text.split(":")
    held = [_fdAndFamily(item) for item in sockets.split(",") if item]
    return int(index), held, int(report)


def _fdAndFamily(item: str) -> tuple[int, int]:
    fd, family = item.split("/")
    return int(fd), int(family)


class WorkerService(SocketsService):
    """
    A worker: serves the adopted sockets like a single process would, and
    sends its tallies to the master every second and at the end.  If the
    master is gone, it stops.
    """

    log = Logger()

    def __init__(self, index: int, reportFd: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.reportFd = reportFd
        self._reporter: Any = None

    def startService(self) -> None:
        from twisted.internet.task import LoopingCall

        dieWithMaster()
        super().startService()
        self._reporter = LoopingCall(self.report)
        self._reporter.clock = self.reactor
        self._reporter.start(REPORT_INTERVAL, now=False)

    def _ready(self) -> None:
        self.catchSignals()
        self.log.info(
            "worker {index} (pid {pid}) ready: {count} sockets",
            index=self.index,
            pid=os.getpid(),
            count=len(list(self)),
        )

    def report(self) -> None:
        try:
            os.write(self.reportFd, json.dumps(self.tallies()).encode() + b"\n")
        except OSError:
            if self.running:
                self.log.info("worker {index}: the master is gone; stopping", index=self.index)
                self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()
        return super().stopService().addCallback(lambda _: self.report())


def dieWithMaster() -> None:
    """
    In a worker (its environment names the master's PID): have the kernel
    send C{MASTER_DEATH_SIGNAL} (SIGKILL) to this process when the master ends, by
    SIGKILL too, so that no orphan keeps the sockets (Linux: PR_SET_PDEATHSIG);
    if the master has already ended, end now.  Elsewhere, nothing.

    SIGKILL, not SIGTERM: a master is killed when it is to stop at once (the
    OOM killer, or a supervisor whose stop deadline has passed, the drain
    having had its time); a worker that drained on its own would outlive
    the master by up to --drain-timeout.
    """
    master = os.environ.get(MASTER_PID)
    if not master or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(MASTER_DEATH_SIGNAL), 0, 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"prctl(PR_SET_PDEATHSIG): {os.strerror(number)}")
    # The master may have ended before the signal was asked for: then this
    # process has a new parent, and no signal will come.
    if os.getppid() != int(master):
        os.kill(os.getpid(), MASTER_DEATH_SIGNAL)


#: From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
