"""The per-connection layer beside every service: records, reasons, TLS deadline."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from twistsock.connection import ConnectionFactory, TransportInfo, transportOf
from twistsock.services import ServiceFactory

PEER = IPv6Address("TCP", "::ffff:127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 5000)


@pytest.fixture
def records():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield lambda namespace="twistsock.connection.Connection": [e for e in observer if e.get("log_namespace", "") == namespace]
    globalLogPublisher.removeObserver(observer)


def connect(name="echo", transport=TransportInfo("tcp"), clock=None):
    factory = ConnectionFactory(ServiceFactory(name), transport, handshakeTimeout=10, reactor=clock or MemoryReactorClock())
    protocol = factory.buildProtocol(PEER)
    wire = StringTransport(hostAddress=HOST, peerAddress=PEER)
    protocol.makeConnection(wire)
    return protocol, wire


@pytest.mark.parametrize(
    "endpoint, name, tls",
    [
        ("tcp:5000", "tcp", False),
        ("tcp6:5000:interface=\\:\\:1", "tcp6", False),
        ("unix:/tmp/x.sock", "unix", False),
        ("ssl:443:privateKey=k.pem", "tls", True),
        ("tls:/etc/certs:port=443", "tls", True),
        ("mtls:443:privateKey=k:clientCA=c", "mtls", True),
        ("proxy:tcp:5000", "proxy", False),
        ("proxy:ssl:443:privateKey=k.pem", "proxy+tls", True),
        ("proxy:mtls:443:privateKey=k:clientCA=c", "proxy+mtls", True),
        ("haproxy:tcp:5000", "proxy", False),
        # Twisted's haproxy: sits between TLS and us and hides the handshake.
        ("haproxy:ssl:443:privateKey=k.pem", "proxy+tls", False),
        ("systemd:domain=INET6:name=echo", "tcp6", False),
        ("systemd:domain=UNIX:index=0", "unix", False),
        ("stdio:", "stdio", False),
    ],
)
def test_transport_names(endpoint, name, tls):
    assert transportOf(endpoint) == TransportInfo(name, tls)


def test_record_of_an_echo_the_peer_closed(records):
    protocol, wire = connect()
    protocol.dataReceived(b"hello")
    protocol.dataReceived(b"!")
    protocol.readConnectionLost()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert wire.value() == b"hello!"
    (event,) = records()
    assert {k: event[k] for k in ("service", "transport", "peer", "local", "reason", "bytes_in", "bytes_out", "detail")} == {
        "service": "echo",
        "transport": "tcp",
        "peer": "127.0.0.1:40000",  # IPv4-mapped shows as plain IPv4
        "local": "127.0.0.1:5000",
        "reason": "peer closed",
        "bytes_in": 6,
        "bytes_out": 6,
        "detail": None,
    }
    assert formatEvent(event).startswith("echo tcp 127.0.0.1:40000 -> 127.0.0.1:5000: peer closed after ")
    assert formatEvent(event).endswith(" s, 6 bytes in, 6 bytes out")


def test_record_when_the_service_closes(records):
    protocol, wire = connect("upper")
    protocol.dataReceived(b"abc\n")
    assert wire.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    (event,) = records()
    assert (event["reason"], event["bytes_in"], event["bytes_out"]) == ("service closed", 4, 4)


def test_record_of_a_reset(records):
    protocol, _ = connect()
    protocol.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
    (event,) = records()
    assert (event["reason"], event["detail"]) == ("error", "Connection reset by peer")


def test_tls_handshake_deadline(records):
    clock = MemoryReactorClock()
    protocol, wire = connect(transport=TransportInfo("tls", True), clock=clock)
    clock.advance(9.9)
    assert not wire.disconnecting
    clock.advance(0.1)
    protocol.connectionLost(Failure(ConnectionLost()))
    (event,) = records()
    assert (event["reason"], event["detail"]) == ("tls handshake timeout", "no handshake within 10 s")


class Certificate:
    class _C:
        class subject:
            @staticmethod
            def rfc4514_string():
                return "CN=twistsock client"

    def to_cryptography(self):
        return self._C()


def test_completed_handshake_cancels_the_deadline_and_names_the_client(records):
    clock = MemoryReactorClock()
    protocol, wire = connect(transport=TransportInfo("mtls", True), clock=clock)
    wire.getPeerCertificate = lambda: Certificate()
    protocol.handshakeCompleted()
    assert clock.getDelayedCalls() == []
    protocol.dataReceived(b"x")
    protocol.connectionLost(Failure(ConnectionDone()))
    (event,) = records()
    assert event["tls_client_subject"] == "CN=twistsock client"
    assert formatEvent(event).endswith(", client certificate CN=twistsock client")


def test_failed_handshake_is_one_record(records):
    from OpenSSL import SSL

    protocol, _ = connect(transport=TransportInfo("tls", True))
    protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "wrong version number")])))
    (event,) = records()
    assert (event["reason"], event["detail"]) == ("tls handshake failed", "wrong version number")
    assert event["bytes_in"] == 0


# -- the registry: limits, idle sweeping, draining (a fake clock) --

from twistsock.connection import Connections  # noqa: E402


def open_(connections, clock, name="echo", peer=PEER):
    factory = ConnectionFactory(ServiceFactory(name), TransportInfo("tcp"), connections=connections, reactor=clock)
    protocol = factory.buildProtocol(peer)
    wire = StringTransport(hostAddress=HOST, peerAddress=peer)
    protocol.makeConnection(wire)
    return protocol, wire


def close(protocol):
    protocol.connectionLost(Failure(ConnectionDone()))


def test_idle_sweep_closes_the_silent_and_spares_the_talkative(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=2)
    connections.start()
    talkative, talkWire = open_(connections, clock)
    silent, silentWire = open_(connections, clock)
    for _ in range(12):  # 6 seconds, a byte every half second
        clock.advance(0.5)
        talkative.dataReceived(b".")
    assert silentWire.disconnecting and not talkWire.disconnecting
    close(silent)
    assert [e["reason"] for e in records()] == ["idle timeout"]
    connections.stop()


def test_limits_total_and_per_peer(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, maxConnections=3, maxPerPeer=2, idleTimeout=0)
    a, _ = open_(connections, clock)
    b, _ = open_(connections, clock)
    c, cWire = open_(connections, clock)  # a third from the same address
    assert cWire.disconnecting
    d, _ = open_(connections, clock, peer=IPv4Address("TCP", "127.0.0.2", 1))
    e, eWire = open_(connections, clock, peer=IPv4Address("TCP", "127.0.0.3", 1))  # a fourth in all
    assert eWire.disconnecting
    for p in (c, e):
        close(p)
    # One burst: the first refusal is recorded, the second counted, then summed up after a quiet second.
    assert [(r["reason"], r["detail"]) for r in records()] == [("limit", "max per peer")]
    assert connections.refused == {("echo", "max per peer"): 1, ("echo", "max connections"): 1}
    clock.advance(1)
    (summary,) = records("twistsock.connection.Connections")
    assert (summary["count"], summary["reasons"]) == (1, "1 by max connections")
    assert len(connections.active) == 3
    close(a)
    f, fWire = open_(connections, clock)
    assert not fWire.disconnecting


def test_drain_waits_for_open_connections_then_closes_the_rest(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=0)
    finishing, _ = open_(connections, clock)
    lingering, lingeringWire = open_(connections, clock)
    drained = connections.drain(10)
    assert not drained.called
    late, lateWire = open_(connections, clock)
    assert lateWire.disconnecting  # nobody new while draining
    close(late)
    close(finishing)
    assert not drained.called
    clock.advance(10)
    assert lingeringWire.disconnecting
    close(lingering)
    assert drained.called
    assert [r["reason"] for r in records()] == ["limit", "peer closed", "server shutdown"]


class TCPWire(StringTransport):
    """A transport that remembers TCP_NODELAY, as a Twisted TCP transport would apply it."""

    noDelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


def test_nagle_is_off_from_the_second_write_of_a_tcp_connection():
    """A first write has nothing unacknowledged before it: Nagle cannot delay it, so one reply costs no setsockopt."""
    factory = ConnectionFactory(ServiceFactory("echo"), TransportInfo("tcp"), reactor=MemoryReactorClock())
    wire = TCPWire(hostAddress=HOST, peerAddress=PEER)
    protocol = factory.buildProtocol(PEER)
    protocol.makeConnection(wire)
    protocol.dataReceived(b"first")
    assert wire.noDelay is False and wire.value() == b"first"
    protocol.dataReceived(b"second")
    assert wire.noDelay is True and wire.value() == b"firstsecond"


def test_nagle_is_off_at_once_under_tls():
    """A handshake is several writes in a row."""
    factory = ConnectionFactory(ServiceFactory("echo"), TransportInfo("tls", tls=True), reactor=MemoryReactorClock())
    wire = TCPWire(hostAddress=HOST, peerAddress=PEER)
    factory.buildProtocol(PEER).makeConnection(wire)
    assert wire.noDelay is True


def test_transports_without_tcp_options_are_left_alone():
    protocol, wire = connect()  # a StringTransport has no setTcpNoDelay, like a UNIX socket
    protocol.dataReceived(b"still echoes")
    assert wire.value() == b"still echoes"


def test_a_long_burst_of_refusals_is_summed_up_every_10_s(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, maxConnections=1, idleTimeout=0)
    open_(connections, clock)
    for _ in range(100):  # four refusals a second for 25 s
        close(open_(connections, clock)[0])
        clock.advance(0.25)
    clock.advance(2)
    summaries = [(e["count"], e["reasons"]) for e in records("twistsock.connection.Connections") if "more connections refused" in e["log_format"]]
    # 1 recorded; 39 summed up at 10 s, 40 at 20 s, the last 20 once a second passed without one.
    assert summaries == [(39, "39 by max connections"), (40, "40 by max connections"), (20, "20 by max connections")]
    assert len(records()) == 1


# -- the local address, from the listening port when it is bound to one --


def _connectTo(reactor, listenOn: str, connectTo: str):
    """Listen on C{listenOn}, connect from C{connectTo}; fire with the server side's L{Connection}."""
    import socket

    from twisted.internet import defer

    made: defer.Deferred = defer.Deferred()
    factory = ConnectionFactory(ServiceFactory("sink"), TransportInfo("tcp"))
    build = factory.buildProtocol

    def buildProtocol(addr):
        connection = build(addr)
        original = connection.makeConnection

        def makeConnection(transport):
            original(transport)
            reactor.callLater(0, made.callback, connection)

        connection.makeConnection = makeConnection
        return connection

    factory.buildProtocol = buildProtocol
    port = reactor.listenTCP(0, factory, interface=listenOn)
    client = socket.create_connection((connectTo, port.getHost().port))
    return made, port, client


@pytest_twisted.inlineCallbacks
def test_a_port_bound_to_one_address_gives_its_connections_that_address():
    from twisted.internet import reactor

    made, port, client = _connectTo(reactor, "127.0.0.1", "127.0.0.1")
    try:
        connection = yield made
        assert connection.host == IPv4Address("TCP", "127.0.0.1", port.getHost().port)
        assert connection.host == connection.transport.getHost()  # what the kernel says too
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_wildcard_port_gives_each_connection_the_address_it_came_to():
    from twisted.internet import reactor

    made, port, client = _connectTo(reactor, "0.0.0.0", "127.0.0.2")
    try:
        connection = yield made
        assert connection.host == IPv4Address("TCP", "127.0.0.2", port.getHost().port)
    finally:
        client.close()
        yield port.stopListening()
