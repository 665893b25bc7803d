"""The per-connection layer beside every service: records, reasons, TLS deadline."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
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
    yield lambda namespace="twistsock.connection.Connection": [
        e for e in observer if e.get("log_namespace", "") == namespace
    ]
    globalLogPublisher.removeObserver(observer)


def connect(name="echo", transport=TransportInfo("tcp"), clock=None):
    return through(
        ConnectionFactory(
            ServiceFactory(name),
            transport,
            handshakeTimeout=10,
            reactor=clock or MemoryReactorClock(),
        )
    )


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
    assert {
        k: event[k]
        for k in (
            "service",
            "transport",
            "peer",
            "local",
            "reason",
            "bytes_in",
            "bytes_out",
            "detail",
        )
    } == {
        "service": "echo",
        "transport": "tcp",
        "peer": "127.0.0.1:40000",  # IPv4-mapped shows as plain IPv4
        "local": "127.0.0.1:5000",
        "reason": "peer closed",
        "bytes_in": 6,
        "bytes_out": 6,
        "detail": None,
    }
    assert formatEvent(event).startswith(
        "echo tcp 127.0.0.1:40000 -> 127.0.0.1:5000: peer closed after "
    )
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
    assert (event["reason"], event["detail"]) == (
        "tls handshake timeout",
        "no handshake within 10 s",
    )


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


def through(factory, peer=PEER):
    """One connection from C{peer} through C{factory}, on a memory transport: (protocol, wire)."""
    protocol = factory.buildProtocol(peer)
    wire = StringTransport(hostAddress=HOST, peerAddress=peer)
    protocol.makeConnection(wire)
    return protocol, wire


def open_(connections, clock, name="echo", peer=PEER):
    return through(
        ConnectionFactory(
            ServiceFactory(name), TransportInfo("tcp"), connections=connections, reactor=clock
        ),
        peer,
    )


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
    # One burst: the first refusal is recorded, the second counted, then summed
    # up after a quiet second.
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
    """
    A first write has nothing unacknowledged before it: Nagle cannot delay it,
    so one reply costs no setsockopt.
    """
    factory = ConnectionFactory(
        ServiceFactory("echo"), TransportInfo("tcp"), reactor=MemoryReactorClock()
    )
    wire = TCPWire(hostAddress=HOST, peerAddress=PEER)
    protocol = factory.buildProtocol(PEER)
    protocol.makeConnection(wire)
    protocol.dataReceived(b"first")
    assert wire.noDelay is False and wire.value() == b"first"
    protocol.dataReceived(b"second")
    assert wire.noDelay is True and wire.value() == b"firstsecond"


def test_nagle_is_off_at_once_under_tls():
    """A handshake is several writes in a row."""
    factory = ConnectionFactory(
        ServiceFactory("echo"), TransportInfo("tls", tls=True), reactor=MemoryReactorClock()
    )
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
    summaries = [
        (e["count"], e["reasons"])
        for e in records("twistsock.connection.Connections")
        if "more connections refused" in e["log_format"]
    ]
    # 1 recorded; 39 summed up at 10 s, 40 at 20 s, the last 20 once a second passed without one.
    assert summaries == [
        (39, "39 by max connections"),
        (40, "40 by max connections"),
        (20, "20 by max connections"),
    ]
    assert len(records()) == 1


# -- the local address, from the listening port when it is bound to one --


def _connectTo(reactor, listenOn: str, connectTo: str):
    """
    Listen on C{listenOn}, connect from C{connectTo}; fire with the server
    side's L{Connection}.
    """
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


# -- deadlines on the sweep: idle never early, lines, PROXY headers --

from twistsock.connection import networkKey  # noqa: E402
from twistsock.proxy import ProxyHeaderFactory  # noqa: E402


@pytest.mark.parametrize("timeout", [1, 2, 30])
@pytest.mark.parametrize("offset", [0.0, 0.01, 0.13, 0.24, 0.249, 0.5, 0.99])
def test_the_idle_timeout_is_never_early_and_at_most_a_second_late(records, timeout, offset):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=timeout, lineTimeout=0, proxyTimeout=0)
    connections.start()
    protocol, wire = open_(connections, clock)
    clock.advance(3 + offset)  # the last byte arrives anywhere within a tick
    protocol.dataReceived(b".")
    last = clock.seconds()
    while not wire.disconnecting and clock.seconds() < last + timeout + 5:
        clock.advance(0.01)
    silence = clock.seconds() - last
    assert timeout <= silence <= timeout + 1 + 1e-9, silence
    close(protocol)
    connections.stop()


def line_(connections, clock, keepOpen=False):
    from twistsock.services import ServiceConfig

    return through(
        ConnectionFactory(
            ServiceFactory("upper", ServiceConfig(keepOpen=keepOpen)),
            TransportInfo("tcp"),
            connections=connections,
            reactor=clock,
        )
    )


def test_a_trickled_line_is_closed_by_the_line_deadline_though_never_idle(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=30, lineTimeout=3, proxyTimeout=0)
    connections.start()
    protocol, wire = line_(connections, clock)
    clock.advance(0.3)
    started = clock.seconds()
    for _ in range(100):  # a byte every half second, never a newline
        protocol.dataReceived(b"x")
        clock.advance(0.5)
        if wire.disconnecting:
            break
    assert wire.disconnecting
    assert 3 <= clock.seconds() - started <= 4.5
    close(protocol)
    (record,) = records()
    assert (record["reason"], record["detail"]) == ("line timeout", "no complete line within 3 s")
    connections.stop()


def test_under_keep_open_each_line_has_its_own_deadline(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=0, lineTimeout=2, proxyTimeout=0)
    connections.start()
    protocol, wire = line_(connections, clock, keepOpen=True)
    for _ in range(10):  # ten lines, each taking 1.5 s in three pieces: 15 s in all
        for piece in (b"ab", b"cd", b"ef\n"):
            protocol.dataReceived(piece)
            clock.advance(0.5)
    assert not wire.disconnecting
    assert wire.value() == b"ABCDEF\n" * 10
    protocol.dataReceived(b"two lines\nand the start of a th")  # a new line starts in the same read
    started = clock.seconds()
    while not wire.disconnecting and clock.seconds() < started + 10:
        clock.advance(
            0.05
        )  # the sweep counts its own runs: time passes in steps, as in a running reactor
    # By its own deadline, though the read also finished a line; not before it.
    assert 2 <= clock.seconds() - started <= 3
    close(protocol)
    connections.stop()


def test_a_silent_client_of_a_line_service_is_only_idle(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=0, lineTimeout=1, proxyTimeout=0)
    connections.start()
    protocol, wire = line_(connections, clock)
    clock.advance(10)
    assert not wire.disconnecting  # no line has started: the line deadline does not apply
    close(protocol)
    connections.stop()


def advance(clock, seconds, step=0.05):
    """
    Let time pass in small steps, as a running reactor does (a LoopingCall
    skips the runs it missed).
    """
    for _ in range(round(seconds / step)):
        clock.advance(step)


def proxied_(connections, clock, peer=PEER):
    """A proxy:tcp: connection as twistsock builds it: PROXY reader -> Connection -> service."""
    return through(
        ProxyHeaderFactory(
            ConnectionFactory(
                ServiceFactory("echo"),
                TransportInfo("proxy"),
                connections=connections,
                reactor=clock,
            )
        ),
        peer,
    )


def test_a_connection_waiting_for_its_proxy_header_counts_against_the_limits(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, maxConnections=2, idleTimeout=0, proxyTimeout=5)
    connections.start()
    a, aWire = proxied_(connections, clock)
    b, bWire = proxied_(connections, clock)
    assert len(connections.active) == 2 and connections.opened[("echo", "proxy")] == 2
    c, cWire = proxied_(connections, clock)
    assert (
        cWire.disconnecting and not aWire.disconnecting
    )  # refused at accept: the header never mattered
    close(c)
    a.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\nhi")
    assert aWire.value() == b"hi"
    close(a)
    close(b)
    reasons = [(r["reason"], r["detail"], r["peer"]) for r in records()]
    # b connected and closed without a byte: a load balancer's health check, counted but not logged.
    assert reasons == [
        ("limit", "max connections", "127.0.0.1:40000"),
        ("peer closed", None, "192.0.2.7:4000"),
    ]
    assert connections.opened[("echo", "proxy")] == 2
    assert not connections.active and not connections.perPeer
    connections.stop()


@pytest.mark.parametrize(
    "lost, reason, detail",
    [
        (ConnectionDone(), "peer closed", "before its PROXY header (11 bytes of it)"),
        (
            ConnectionLost(),
            "error",
            "Connection to the other side was lost in a non-clean fashion, "
            "before its PROXY header (11 bytes of it)",
        ),
    ],
)
def test_a_connection_lost_in_its_proxy_header_says_how(records, lost, reason, detail):
    """A FIN in the middle of the header is the peer closing; a reset is an error, as elsewhere."""
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=0, proxyTimeout=5)
    protocol, _ = proxied_(connections, clock)
    protocol.dataReceived(b"PROXY TCP4 ")
    protocol.connectionLost(Failure(lost))
    (record,) = records()
    assert (record["reason"], record["detail"], record["bytes_in"]) == (reason, detail, 11)


def test_the_proxy_header_has_a_deadline_and_timeouts_are_summed_up(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, idleTimeout=30, proxyTimeout=2)
    connections.start()
    opened = [proxied_(connections, clock) for _ in range(50)]
    opened[0][0].dataReceived(b"PROXY TCP4 192.0")  # part of a header: still late
    advance(clock, 1.95)
    assert not any(wire.disconnecting for _, wire in opened)
    advance(clock, 1.05)
    assert all(wire.disconnecting for _, wire in opened)
    for protocol, _ in opened:
        close(protocol)
    advance(clock, 1.5)  # a quiet second ends the burst
    first, *rest = records()
    assert (first["reason"], first["detail"], first["bytes_in"]) == (
        "proxy header timeout",
        "no PROXY header within 2 s",
        16,
    )
    assert rest == []  # the other 49 are summed up
    (summary,) = records("twistsock.connection.Connections")
    assert (summary["count"], summary["reasons"]) == (49, "49 by proxy header timeout")
    assert not connections.active
    connections.stop()


def test_the_per_peer_limit_counts_the_client_the_proxy_header_names(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, maxPerPeer=1, idleTimeout=0, proxyTimeout=5)
    # Before their headers every connection comes from the balancer: none is refused per peer.
    (a, aWire), (b, bWire), (c, cWire), (d, dWire) = [
        proxied_(connections, clock) for _ in range(4)
    ]
    assert (
        not any(w.disconnecting for w in (aWire, bWire, cWire, dWire)) and not connections.perPeer
    )
    a.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\n")
    assert connections.perPeer == {"192.0.2.7": 1}
    b.dataReceived(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 4001 80\r\n")  # the same client, IPv4-mapped
    assert bWire.disconnecting
    close(b)
    c.dataReceived(b"PROXY TCP4 192.0.2.8 127.0.0.1 4000 80\r\n")
    assert not cWire.disconnecting and connections.perPeer == {"192.0.2.7": 1, "192.0.2.8": 1}
    assert [(r["reason"], r["detail"], r["peer"]) for r in records()] == [
        ("limit", "max per peer", "192.0.2.7:4001")
    ]


@pytest.mark.parametrize("service", ["echo", "upper", "sink", "ack"])
def test_a_client_refused_by_its_proxy_header_with_data_in_the_same_read(records, service):
    """The bytes after the header reach no service: none was started for a refused client."""
    clock = MemoryReactorClock()
    connections = Connections(clock, maxPerPeer=1, idleTimeout=0, proxyTimeout=5)

    def proxied():
        return through(
            ProxyHeaderFactory(
                ConnectionFactory(
                    ServiceFactory(service),
                    TransportInfo("proxy"),
                    connections=connections,
                    reactor=clock,
                )
            ),
            PEER,
        )

    (held, heldWire), (refused, refusedWire) = proxied(), proxied()
    held.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\n")
    refused.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 4001 80\r\nsecond\n")
    assert refusedWire.disconnecting and refusedWire.value() == b""
    close(refused)
    (record,) = records()
    assert (record["reason"], record["detail"], record["peer"], record["bytes_in"]) == (
        "limit",
        "max per peer",
        "192.0.2.7:4001",
        0,
    )
    assert not heldWire.disconnecting


@pytest.mark.parametrize(
    "address, prefixes, key",
    [
        ("192.0.2.7", (32, 64), "192.0.2.7"),
        ("192.0.2.7", (24, 64), "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", (32, 64), "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", (32, 128), "2001:db8:1:2:3:4:5:6"),
        ("2001:DB8:1:2::9", (32, 48), "2001:db8:1::/48"),
        ("::ffff:192.0.2.7", (24, 64), "192.0.2.0/24"),
        ("::ffff:c000:207", (32, 64), "192.0.2.7"),
        ("fe80::1%eth0", (32, 128), "fe80::1"),
    ],
)
def test_network_keys(address, prefixes, key):
    assert networkKey(address, prefixes) == key


def test_one_ipv6_client_walking_its_64_is_one_peer(records):
    clock = MemoryReactorClock()
    connections = Connections(clock, maxPerPeer=20, idleTimeout=0)
    wires = [
        open_(connections, clock, peer=IPv6Address("TCP", f"2001:db8:0:1::{i:x}", 1))[1]
        for i in range(1, 151)
    ]
    assert sum(not w.disconnecting for w in wires) == 20
    other = open_(connections, clock, peer=IPv6Address("TCP", "2001:db8:0:2::1", 1))[1]
    assert not other.disconnecting


@pytest.mark.parametrize(
    "lost, reason",
    [
        (ConnectionLost(), "error"),  # reset before the reply went out: what the client saw
        (ConnectionAborted(), "service closed"),  # our own abort after the service closed
        (ConnectionDone(), "service closed"),
    ],
)
def test_a_service_close_that_ends_in_a_reset_is_an_error(records, lost, reason):
    protocol, wire = connect("upper")
    protocol.dataReceived(b"hello\n")  # answered, and the service closes
    protocol.connectionLost(Failure(lost))
    (event,) = records()
    assert event["reason"] == reason
    assert event["bytes_out"] == len(b"HELLO\n")
