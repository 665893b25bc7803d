"""
twistsock's reactor (twistsock.reactor) when a selectable misbehaves: its
descriptor vanishes, or its connectionLost and logPrefix raise. The reactor
logs and goes on serving the others, as Twisted's epoll reactor does.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.error import ConnectionFdescWentAway
from twisted.logger import globalLogPublisher

from twistsock.reactor import TwistsockReactor


@pytest.fixture
def reactor():
    reactor = TwistsockReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)
    reactor._poller.close()


@pytest.fixture
def errors():
    found: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") or event.get("failure"):
            found.append(event)

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


class Selectable:
    def __init__(self, sock: socket.socket, prefix: str = "Selectable") -> None:
        self.sock = sock
        self.prefix = prefix
        self.read = b""
        self.lost: list = []
        self.gone = False

    def fileno(self) -> int:
        return -1 if self.gone else self.sock.fileno()

    def doRead(self):
        self.read += self.sock.recv(65536)
        return None

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)

    def logPrefix(self) -> str:
        return self.prefix


class Buggy(Selectable):
    def doRead(self):
        raise RuntimeError("doRead fails")

    def connectionLost(self, reason) -> None:
        raise RuntimeError("connectionLost fails too")

    def logPrefix(self) -> str:
        raise RuntimeError("and so does logPrefix")


def readable(reactor, kind=Selectable):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    selectable = kind(ours)
    reactor.addReader(selectable)
    theirs.sendall(b"x")
    return selectable, ours, theirs


def test_a_selectable_whose_descriptor_went_away_is_disconnected(reactor):
    selectable, ours, theirs = readable(reactor)
    selectable.gone = True
    try:
        reactor.doPoll(0)
    finally:
        reactor.removeAll()
        ours.close()
        theirs.close()
    assert len(selectable.lost) == 1 and selectable.lost[0].check(ConnectionFdescWentAway)
    assert selectable.read == b""


def test_a_selectable_that_fails_everywhere_is_logged_and_the_others_are_served(reactor, errors):
    buggy, b1, b2 = readable(reactor, Buggy)
    good, g1, g2 = readable(reactor)
    try:
        reactor.doPoll(0)
    finally:
        reactor.removeAll()
        for s in (b1, b2, g1, g2):
            s.close()
    assert good.read == b"x"
    systems = {event.get("system") for event in errors}
    assert "(buggy logPrefix method)" in systems
    failures = [(e.get("log_failure") or e["failure"]).value for e in errors]
    assert any(str(f) == "connectionLost fails too" for f in failures)
