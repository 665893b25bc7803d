"""
The --workers master and worker services without processes: tally reports,
restart back-off, the drain deadline, SIGHUP, and a worker whose master is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from twistsock import workers


class FakeProcess:
    def __init__(self, pid: int, gone: bool = False) -> None:
        self.pid = pid
        self.gone = gone
        self.signals: list[int] = []

    def signalProcess(self, number: int) -> None:
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(number)


class ProcessReactor(MemoryReactorClock):
    """A memory reactor whose spawnProcess records the worker and hands back a fake process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[workers._Worker, dict[str, str], FakeProcess]] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kwargs):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, env, process))
        return process


@pytest.fixture
def logged():
    """The text of every log event while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def master(
    count: int = 2, drainTimeout: float = 10.0
) -> tuple[workers.MasterService, ProcessReactor]:
    reactor = ProcessReactor()
    service = workers.MasterService(
        count, ["twist", "sockets"], reactor=reactor, drainTimeout=drainTimeout
    )
    service.startService()
    return service, reactor


def killed(number: int) -> Failure:
    return Failure(ProcessTerminated(signal=number))


def test_tallies_are_the_last_whole_report_of_each_worker_plus_those_of_ended_ones():
    service, reactor = master()
    (one, _, _), (two, _, _) = reactor.spawned[:2]
    # A report may arrive in pieces; only whole lines count, blank ones are skipped.
    one.childDataReceived(4, b'{"connections": {"echo\\ttcp": 3}}\n{"connections": {"ec')
    assert one.tallies == {"connections": {"echo\ttcp": 3}}
    one.childDataReceived(4, b'ho\\ttcp": 5}, "connections_active": {"echo\\ttcp": 2}}\n\n')
    two.childDataReceived(4, json.dumps({"connections": {"echo\ttcp": 7}}).encode() + b"\n")
    assert service.tallies()["connections"]["echo\ttcp"] == 12
    assert service.tallies()["connections_active"]["echo\ttcp"] == 2

    # Worker 1 dies: its counters stay in the sum, its open connections are gone.
    one.processEnded(killed(signal.SIGKILL))
    total = service.tallies()
    assert total["connections"]["echo\ttcp"] == 12
    assert total["connections_active"].get("echo\ttcp", 0) == 0


def test_a_worker_that_keeps_dying_waits_longer_each_time_and_one_that_lived_restarts_in_1_s(
    logged,
):
    service, reactor = master(count=1)
    for expected in (1, 2, 4, 8, 16, 30, 30):
        worker, _, process = reactor.spawned[-1]
        worker.processEnded(killed(signal.SIGKILL))
        assert f"restarting worker 1 in {expected} s" in logged[-1]
        spawned = len(reactor.spawned)
        reactor.advance(expected - 0.1)
        assert len(reactor.spawned) == spawned, "restarted before its back-off"
        reactor.advance(0.1)
        assert len(reactor.spawned) == spawned + 1
    # A worker that served for longer than the longest back-off starts afresh.
    worker, _, process = reactor.spawned[-1]
    reactor.advance(workers.MAX_BACKOFF + 1)
    worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert f"worker 1 (pid {process.pid}) ended: exit status 1" in logged[-2]
    assert "restarting worker 1 in 1 s" in logged[-1]


def test_the_worker_environment_names_the_master_and_the_report_descriptor():
    service, reactor = master(count=2)
    (_, env1, _), (_, env2, _) = reactor.spawned
    assert env1[workers.MASTER_PID] == str(os.getpid())
    # No stream socket held: no inherited sockets, the report pipe on descriptor 3.
    assert workers.parseWorker(env1[workers.WORKER]) == (1, [], 3)
    assert workers.parseWorker(env2[workers.WORKER]) == (2, [], 3)


def test_stop_sigterms_every_worker_and_sigkills_one_still_running_5_s_after_the_drain(logged):
    service, reactor = master(count=3, drainTimeout=10)
    (one, _, p1), (two, _, p2), (three, _, p3) = reactor.spawned
    p3.gone = True  # it has exited; its end is not reported yet
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    assert p1.signals == [signal.SIGTERM] and p2.signals == [signal.SIGTERM]
    assert any("waiting for 3 workers to drain" in line for line in logged)
    assert not service.healthy()
    one.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
    three.processEnded(Failure(ProcessDone(0)))
    reactor.advance(10 + 5 - 0.1)
    assert p2.signals == [signal.SIGTERM]
    reactor.advance(0.1)
    assert p2.signals == [signal.SIGTERM, signal.SIGKILL]
    assert any("worker 2 still running after the drain: killing it" in line for line in logged)
    assert stopped == []
    two.processEnded(killed(signal.SIGKILL))
    assert stopped == [None]
    # Stopping: nothing is restarted.
    reactor.advance(workers.MAX_BACKOFF * 2)
    assert len(reactor.spawned) == 3
    assert any("ended: exit status 0" in line for line in logged)


def test_sighup_goes_only_to_workers_that_have_reported(logged):
    service, reactor = master(count=2)
    (one, _, p1), (two, _, p2) = reactor.spawned
    one.childDataReceived(4, b'{"connections": {}}\n')
    service.hangup()
    assert p1.signals == [signal.SIGHUP]
    assert p2.signals == [], "a worker still starting has no SIGHUP handler: it would die"


@pytest.mark.parametrize(
    "address, family",
    [
        (IPv4Address("TCP", "127.0.0.1", 5000), socket.AF_INET),
        (IPv6Address("TCP", "::1", 5000), socket.AF_INET6),
        (UNIXAddress(b"/tmp/x.sock"), socket.AF_UNIX),
    ],
)
def test_family_of_each_listening_address(address, family):
    assert workers.familyOf(address) == family


def test_an_address_workers_cannot_share_is_refused_by_name():
    with pytest.raises(ValueError, match="cannot hand .* to workers"):
        workers.familyOf("udp:5000")


class StoppingReactor(MemoryReactorClock):
    stops = 0

    def stop(self) -> None:
        self.stops += 1


def test_a_worker_whose_master_is_gone_stops(logged):
    r, w = os.pipe()
    os.close(r)  # the master's end: gone
    reactor = StoppingReactor()
    worker = workers.WorkerService(1, w, reactor=reactor)
    worker.running = True
    try:
        worker.report()
    finally:
        os.close(w)
    assert reactor.stops == 1
    assert any("worker 1: the master is gone; stopping" in line for line in logged)


def test_a_worker_reports_its_tallies_as_one_json_line():
    r, w = os.pipe()
    try:
        worker = workers.WorkerService(2, w, reactor=MemoryReactorClock())
        worker.connections.opened[("echo", "tcp")] += 4
        worker.report()
        line = os.read(r, 65536)
    finally:
        os.close(r)
        os.close(w)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["connections"] == {"echo\ttcp": 4}
