"""
The proxy: endpoint alone (the plugin under another Twisted program, with no
twistsock connection layer above it): the header has a deadline of its own.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from twistsock.proxy import ProxyHeaderFactory, ProxyServerParser

V1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 51000 5000\r\n"


class Service(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.peer = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class ReactorTransport(StringTransport):
    """A memory transport with the reactor Twisted's socket transports carry."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.reactor = clock
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


@pytest.fixture
def logged():
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def accept(timeout: float = 5.0):
    clock = Clock()
    factory = ProxyHeaderFactory(Factory.forProtocol(Service), timeout=timeout)
    protocol = factory.buildProtocol(None)
    transport = ReactorTransport(clock)
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_a_client_without_a_header_within_the_deadline_is_aborted_and_logged(logged):
    protocol, transport, clock = accept(timeout=5)
    protocol.dataReceived(b"PROX")
    clock.advance(4.9)
    assert not transport.aborted
    clock.advance(0.1)
    assert transport.aborted
    assert logged[-1] == "127.0.0.1:40000 closed: no PROXY header within 5 s (4 bytes of it)"
    assert protocol.wrapped.transport is None, "the service never saw the client"


def test_a_header_in_time_cancels_the_deadline_and_the_service_sees_the_real_client():
    protocol, transport, clock = accept(timeout=5)
    protocol.dataReceived(V1 + b"hello")
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert not transport.aborted
    assert protocol.wrapped.peer == IPv4Address("TCP", "192.0.2.10", 51000)
    assert protocol.wrapped.received == b"hello"


def test_a_client_gone_before_its_header_is_logged_and_its_deadline_cancelled(logged):
    protocol, transport, clock = accept(timeout=5)
    protocol.dataReceived(b"PROXY TCP4 192")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []
    assert logged[-1] == ("127.0.0.1:40000 closed before its PROXY header was complete (14 bytes)")


def test_no_deadline_with_timeout_0():
    protocol, transport, clock = accept(timeout=0)
    assert clock.getDelayedCalls() == []


def test_a_factory_that_refuses_a_connection_refuses_it_beneath_the_header_reader_too():
    class Refusing(Factory):
        def buildProtocol(self, addr):
            return None

    assert ProxyHeaderFactory(Refusing()).buildProtocol(None) is None


def test_proxy_without_an_endpoint_says_what_to_write():
    with pytest.raises(ValueError, match="proxy: needs an endpoint to wrap, as in proxy:tcp:5000"):
        ProxyServerParser().parseStreamServer(object())
