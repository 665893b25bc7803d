"""
Running out of file descriptors, as one listening port's logger sees it
(twistsock._accepts): one warning per burst, one summary after a quiet second,
every refusal counted; other events pass through.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from twistsock import _accepts
from twistsock._accepts import QUIET, REFUSED_NO_DESCRIPTORS, AcceptErrors


class Port:
    """What AcceptErrors.watch needs of a Twisted port: its logger."""

    def __init__(self, observer) -> None:
        self._logger = Logger(namespace="twisted.internet.tcp.Port", observer=observer)


def watched():
    passed: list[dict] = []
    logged: list[str] = []
    tally: Counter = Counter()
    clock = Clock()
    port = Port(passed.append)
    watcher = AcceptErrors.watch(port, clock, "echo", "tcp:5000", tally)
    watcher.log = Logger(observer=lambda event: logged.append(formatEvent(event)))
    return port, watcher, clock, tally, passed, logged


def refuse(port, address="127.0.0.1:40000") -> None:
    port._logger.info(_accepts._REFUSED, address=address)


def test_a_burst_is_one_warning_then_one_summary_and_every_refusal_is_counted():
    port, watcher, clock, tally, passed, logged = watched()
    port._logger.info(_accepts._NOISE[0])
    refuse(port)
    port._logger.info(_accepts._NOISE[1])
    assert len(logged) == 1
    assert logged[0].startswith(
        "cannot take new connections on tcp:5000 (echo): no file descriptor"
    )
    for _ in range(9):
        clock.advance(0.5)  # refusals keep coming: the burst goes on
        refuse(port)
    port._logger.error(_accepts._FAILED, acceptError="EMFILE")
    assert len(logged) == 1
    clock.advance(QUIET - 0.01)
    assert len(logged) == 1, "summed up before a quiet second"
    clock.advance(0.01)
    assert len(logged) == 2
    assert logged[1] == (
        "taking connections on tcp:5000 (echo) again after 4.5 s: "
        "10 refused, 1 left waiting, for lack of file descriptors"
    )
    assert tally == {("echo", REFUSED_NO_DESCRIPTORS): 10}
    assert passed == [], "Twisted's own lines about it are replaced"

    # The next burst starts afresh.
    refuse(port)
    clock.advance(QUIET)
    assert logged[-1].endswith(
        "again after 0.0 s: 1 refused, 0 left waiting, for lack of file descriptors"
    )


def test_other_events_of_the_port_pass_through_unchanged():
    port, watcher, clock, tally, passed, logged = watched()
    port._logger.info("{name} starting on {port}", name="echo", port=5000)
    assert [formatEvent(e) for e in passed] == ["echo starting on 5000"]
    assert logged == [] and not tally


def test_stopping_during_a_burst_cancels_its_summary():
    port, watcher, clock, tally, passed, logged = watched()
    refuse(port)
    watcher.stop()
    assert clock.getDelayedCalls() == []
    watcher.stop()  # twice is harmless (a port stopped twice)


def test_a_port_without_twisted_logger_is_left_alone():
    class Other:
        _logger = None

    assert AcceptErrors.watch(Other(), Clock(), "echo", "x", Counter()) is None
    assert AcceptErrors.watch(object(), Clock(), "echo", "x", Counter()) is None


def test_an_open_file_limit_that_cannot_be_raised_is_reported_unchanged(monkeypatch):
    monkeypatch.setattr(_accepts.resource, "getrlimit", lambda kind: (1024, 4096))

    def refused(kind, limits):
        raise ValueError("not allowed")

    monkeypatch.setattr(_accepts.resource, "setrlimit", refused)
    assert _accepts.raiseOpenFileLimit() == (1024, 1024)
