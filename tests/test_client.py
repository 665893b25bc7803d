"""The client module: its protocols on memory transports, and real round trips on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from twistsock import client
from twistsock.services import ServiceConfig, ServiceFactory


def made(protocol):
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


def outcome(d: defer.Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# -- the protocols, on memory transports ---------------------------------


def test_echo_protocol_matches_in_any_chunking():
    protocol = client._Echo(b"abcdef")
    transport = made(protocol)
    assert transport.value() == b"abcdef"
    for byte in b"abcdef":
        protocol.dataReceived(bytes([byte]))
    assert transport.disconnecting
    assert not protocol.done.called, "fires once the connection has closed"
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert outcome(protocol.done) == b"abcdef"


def test_echo_protocol_mismatch_names_the_byte():
    protocol = client._Echo(b"abcdef")
    made(protocol)
    protocol.dataReceived(b"abX")
    failure = outcome(protocol.done)
    assert failure.check(client.EchoMismatch)
    assert str(failure.value) == "echo mismatch at byte 2 of 6"


def test_echo_protocol_extra_bytes_are_a_mismatch():
    protocol = client._Echo(b"abc")
    made(protocol)
    protocol.dataReceived(b"abcd")
    assert "1 bytes more came back" in str(outcome(protocol.done).value)


def test_echo_protocol_short_echo_is_a_mismatch():
    protocol = client._Echo(b"abcdef")
    made(protocol)
    protocol.dataReceived(b"abc")
    protocol.connectionLost(Failure(error.ConnectionDone()))
    failure = outcome(protocol.done)
    assert failure.check(client.EchoMismatch)
    assert "closed after 3 of 6 bytes" in str(failure.value)


def test_echo_protocol_empty_message():
    protocol = client._Echo(b"")
    transport = made(protocol)
    assert transport.disconnecting
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert outcome(protocol.done) == b""


def test_line_protocol_reads_one_line():
    protocol = client._Line(b"hello")
    transport = made(protocol)
    assert transport.value() == b"hello\n"
    protocol.dataReceived(b"HEL")
    protocol.dataReceived(b"LO\r\nrest")
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert outcome(protocol.done) == b"HELLO"


def test_line_protocol_bounds_the_reply():
    protocol = client._Line(b"x")
    made(protocol)
    protocol.dataReceived(b"y" * 5000)
    assert outcome(protocol.done).check(client.ConnectionFailed)


def test_send_protocol_writes_then_closes():
    protocol = client._Send(b"data")
    transport = made(protocol)
    assert transport.value() == b"data"
    assert transport.disconnecting
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert outcome(protocol.done) is None


def test_send_protocol_reset_is_an_error():
    protocol = client._Send(b"data")
    made(protocol)
    protocol.connectionLost(Failure(error.ConnectionLost("Connection reset by peer")))
    failure = outcome(protocol.done)
    assert failure.check(client.ConnectionFailed)
    assert str(failure.value) == "connection lost: Connection reset by peer"


def test_until_close_protocol():
    protocol = client._UntilClose(b"msg\n", 100)
    transport = made(protocol)
    assert transport.value() == b"msg\n"
    protocol.dataReceived(b"I got ")
    protocol.dataReceived(b"your message")
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert outcome(protocol.done) == b"I got your message"


def test_until_close_with_no_reply_is_an_error():
    protocol = client._UntilClose(b"msg\n", 100)
    made(protocol)
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert str(outcome(protocol.done).value) == "the server closed the connection without a reply"


# -- timeouts and error translation, on a memory reactor -----------------


@implementer(IStreamClientEndpoint)
class NeverConnects:
    """A client endpoint whose connection attempt never finishes; records cancellation."""

    cancelled = False

    def connect(self, factory):
        def cancel(d):
            self.cancelled = True

        return defer.Deferred(cancel)


def test_timeout_while_connecting_cancels_the_attempt():
    clock = MemoryReactorClock()
    endpoint = NeverConnects()
    d = client.echo(endpoint, b"x", timeout=3, reactor=clock)
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.2)
    failure = outcome(d)
    assert failure.check(client.Timeout)
    assert failure.value.exitStatus == 4
    assert endpoint.cancelled


@implementer(IStreamClientEndpoint)
class ConnectsSilently:
    """A client endpoint that connects to a peer that never answers."""

    def __init__(self):
        self.transport = StringTransport()

    def connect(self, factory):
        self.protocol = protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return defer.succeed(protocol)


def test_timeout_while_closing_keeps_the_result():
    """
    The exchange finished but the close never completed (a TLS peer that never
    answers close_notify).
    """
    clock = MemoryReactorClock()
    endpoint = ConnectsSilently()
    d = client.upper(endpoint, b"x", timeout=10, reactor=clock)
    endpoint.protocol.dataReceived(b"X\n")
    assert endpoint.transport.disconnecting
    clock.advance(10)
    assert outcome(d) == b"X"


def test_timeout_while_waiting_for_the_reply_aborts_the_connection():
    clock = MemoryReactorClock()
    endpoint = ConnectsSilently()
    d = client.upper(endpoint, b"x", timeout=10, reactor=clock)
    assert endpoint.transport.value() == b"x\n"
    clock.advance(10)
    assert outcome(d).check(client.Timeout)
    assert endpoint.transport.disconnecting


@implementer(IStreamClientEndpoint)
class FailsWith:
    def __init__(self, exception):
        self.exception = exception

    def connect(self, factory):
        return defer.fail(self.exception)


@pytest.mark.parametrize(
    "exception, kind, status",
    [
        (error.DNSLookupError("nosuch.invalid"), client.UnknownHost, 2),
        (error.ConnectionRefusedError(), client.ConnectionRefused, 3),
        (error.ConnectError(2, "No such file or directory"), client.ConnectionRefused, 3),
        (error.TimeoutError(), client.Timeout, 4),
        (error.NoRouteError(), client.ConnectionFailed, 1),
    ],
)
def test_connection_errors_become_client_errors(exception, kind, status):
    failure = outcome(client.send(FailsWith(exception), b"x", reactor=MemoryReactorClock()))
    assert type(failure.value) is kind
    assert failure.value.exitStatus == status


def test_malformed_target_raises_at_once():
    with pytest.raises(ValueError, match="bad target"):
        client.echo("nosuch:1", b"x", reactor=MemoryReactorClock())
    with pytest.raises(ValueError, match="between 1 and 65535"):
        client.echo(("localhost", 70000), b"x", reactor=MemoryReactorClock())
    with pytest.raises(ValueError, match="one line"):
        client.upper("tcp:127.0.0.1:1", b"two\nlines", reactor=MemoryReactorClock())


def test_an_address_is_connected_to_as_it_is_and_a_name_is_resolved():
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    running = MemoryReactorClock()
    running.running = True
    assert isinstance(client.endpoint(("::1", 5000), reactor=running), TCP6ClientEndpoint)
    assert isinstance(client.endpoint(("127.0.0.1", 5000), reactor=running), TCP4ClientEndpoint)
    assert isinstance(client.endpoint(("localhost", 5000), reactor=running), HostnameEndpoint)
    # A reactor that is not running (asyncio's, driven by asyncio.run) resolves
    # names in a thread of its own.
    assert isinstance(
        client.endpoint(("localhost", 5000), reactor=MemoryReactorClock()),
        client._ResolvingEndpoint,
    )


# -- real round trips on loopback, against the real services -------------


@pytest.fixture
def listen():
    """Listen with a twistsock service in this process; ports are closed after the test."""
    ports = []

    @defer.inlineCallbacks
    def start(name, endpoint=None, config=ServiceConfig()):
        from twisted.internet import reactor

        endpoint = endpoint or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield endpoint.listen(ServiceFactory(name, config))
        ports.append(port)
        return port

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_echo_round_trip_as_async_def(listen):
    port = await listen("echo")
    data = bytes(range(256)) * 4096
    assert await client.echo(f"tcp:127.0.0.1:{port.getHost().port}", data) == data


@pytest_twisted.inlineCallbacks
def test_upper_and_ack_round_trips_with_host_port(listen):
    upper = yield listen("upper")
    ack = yield listen("ack")
    reply = yield client.upper(("127.0.0.1", upper.getHost().port), b"hello")
    assert reply == b"HELLO"
    reply = yield client.ack(("localhost", ack.getHost().port), b"hi")
    assert reply == b"I got your message"


@pytest_twisted.inlineCallbacks
def test_send_over_unix(short_tmp, listen):
    from twisted.internet import reactor

    path = str(short_tmp / "sink.sock")
    yield listen("sink", UNIXServerEndpoint(reactor, path))
    result = yield client.send(f"unix:path={path}", b"Half a league, half a league ... ")
    assert result is None


@pytest_twisted.inlineCallbacks
def test_refused_on_loopback(refusedPort):
    with pytest.raises(client.ConnectionRefused):
        yield client.echo(("127.0.0.1", refusedPort), b"x")


@pytest_twisted.inlineCallbacks
def test_timeout_on_loopback_against_a_silent_server(listen):
    """sink never answers: echo times out, and the connection is closed."""
    port = yield listen("sink")
    with pytest.raises(client.Timeout):
        yield client.echo(f"tcp:127.0.0.1:{port.getHost().port}", b"x", timeout=0.5)


# -- misuse fails at once, errors say what happened ----------------------


@pytest.mark.parametrize("call", [client.send, client.echo, client.upper, client.ack])
def test_text_where_bytes_are_expected_is_a_type_error_at_once(call):
    with pytest.raises(TypeError, match=r"must be bytes, not str \(encode text first"):
        call(("127.0.0.1", 9), "text", reactor=MemoryReactorClock())


def test_udp_text_is_a_type_error_at_once():
    with pytest.raises(TypeError, match="must be bytes, not str"):
        client.udp(("127.0.0.1", 9), "text", reactor=MemoryReactorClock())


@pytest.mark.parametrize(
    "timeout, kind",
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
@pytest.mark.parametrize("call", [client.send, client.echo, client.upper, client.ack, client.udp])
def test_a_timeout_that_is_not_a_positive_number_is_refused_at_once(call, timeout, kind):
    with pytest.raises(kind, match="timeout must be"):
        call(("127.0.0.1", 9), b"x", timeout=timeout, reactor=MemoryReactorClock())


def test_datagram_sizes_follow_the_address_family():
    clock = MemoryReactorClock()
    with pytest.raises(ValueError, match="at most 65507 bytes"):
        client.udp(("127.0.0.1", 9), b"x" * 65508, reactor=clock)
    client.udp(("::1", 9), b"x" * 65527, reactor=clock)  # IPv6 allows 20 bytes more: accepted
    with pytest.raises(ValueError, match="at most 65527 bytes"):
        client.udp(("::1", 9), b"x" * 65528, reactor=clock)


def test_an_ipv6_literal_in_brackets_in_a_tcp_target():
    from twisted.internet.endpoints import TCP6ClientEndpoint

    endpoint = client.endpoint("tcp:[::1]:5000:timeout=2", reactor=MemoryReactorClock())
    assert isinstance(endpoint, TCP6ClientEndpoint)
    assert (endpoint._host, endpoint._port, endpoint._timeout) == ("::1", 5000, 2.0)


def test_a_server_error_reply_is_a_server_error():
    protocol = client._Line(b"x" * 10)
    made(protocol)
    protocol.dataReceived(b"error: line longer than 65536 bytes\n")
    failure = outcome(protocol.done)
    assert failure.check(client.ServerError) and failure.value.exitStatus == 8
    assert "line longer than 65536 bytes" in str(failure.value)


@pytest_twisted.inlineCallbacks
def test_a_connect_the_server_never_completes_is_a_timeout_naming_the_connect_timeout():
    """A full accept queue: the SYN is never answered, Twisted cancels its attempt."""
    import socket

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        from conftest import openMany

        fillers = openMany(port, 8)  # fill the accept queue (bounded): further SYNs are dropped
        with pytest.raises(client.Timeout, match=r"timed out connecting after 0\.5 s"):
            yield client.echo(f"tcp:127.0.0.1:{port}:timeout=0.5", b"x", timeout=5)
    finally:
        for s in fillers:
            s.close()
        full.close()


@pytest_twisted.inlineCallbacks
def test_a_bytearray_or_memoryview_is_sent_as_its_bytes(listen):
    port = yield listen("echo")
    target = ("127.0.0.1", port.getHost().port)
    assert (yield client.echo(target, bytearray(b"array"))) == b"array"
    assert (yield client.echo(target, memoryview(b"view"))) == b"view"


def test_cancelling_at_once_is_a_cancellation_not_a_timeout():
    clock = MemoryReactorClock()
    d = client.echo(NeverConnects(), b"x", timeout=3, reactor=clock)
    d.cancel()
    assert outcome(d).check(defer.CancelledError)
    clock.advance(10)  # nothing fires later


@pytest.mark.parametrize("target", [None, 5000, ["127.0.0.1", 5000]])
def test_a_target_of_another_type_is_a_type_error_that_says_what_a_target_is(target):
    with pytest.raises(
        TypeError,
        match="a target is an endpoint string, a \\(host, port\\) pair or an IStreamClientEndpoint",
    ):
        client.echo(target, b"x", reactor=MemoryReactorClock())


@pytest_twisted.inlineCallbacks
def test_cancelling_a_connection_to_an_address_at_once_is_a_cancellation(listen):
    port = yield listen("echo")
    d = client.echo(f"tcp:127.0.0.1:{port.getHost().port}", b"hi")
    d.cancel()
    assert outcome(d).check(defer.CancelledError)


@pytest.mark.parametrize("call", [client.echo, client.udp])
@pytest.mark.parametrize("target", [("127.0.0.1",), ("a", 1, 2)])
def test_a_tuple_target_has_two_parts(call, target):
    with pytest.raises(ValueError, match="a \\(host, port\\) target has two parts"):
        call(target, b"x", reactor=MemoryReactorClock())
