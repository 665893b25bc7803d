"""Protocol unit tests for the services, on twisted.internet.testing transports."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher

from twistsock.services import (
    ACK_REPLY,
    SERVICES,
    Ack,
    Echo,
    ServiceConfig,
    ServiceFactory,
    Sink,
    Upper,
)

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


def connect(name: str, config: ServiceConfig = ServiceConfig()):
    protocol = ServiceFactory(name, config).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def feed(protocol, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        protocol.dataReceived(data[i : i + chunk])


@pytest.fixture
def logged():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def texts(observer) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in observer]


def test_lookup_by_name():
    assert SERVICES == {"echo": Echo, "upper": Upper, "sink": Sink, "ack": Ack}
    with pytest.raises(KeyError):
        ServiceFactory("nosuch")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_bounds_its_buffer(name):
    """The transport is its own streaming producer: it stops reading while its buffer is full."""
    _, transport = connect(name)
    assert transport.producer is transport
    assert transport.streaming is True


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_echo_is_byte_exact_for_any_chunking(chunk):
    data = bytes(range(256)) * 1024 + b"\x00\xff\r\n"
    protocol, transport = connect("echo")
    feed(protocol, data, chunk)
    assert transport.value() == data
    assert not transport.disconnecting


def test_echo_half_close_sends_pending_then_closes():
    protocol, transport = connect("echo")
    protocol.dataReceived(b"last words")
    protocol.readConnectionLost()
    assert transport.value() == b"last words"
    assert transport.disconnecting
    assert transport.producer is None, "a paused self-producer would keep the connection open"


def test_upper_one_line_per_connection_like_the_java_server():
    protocol, transport = connect("upper")
    protocol.dataReceived(b"hello World\nsecond line\n")
    assert transport.value() == b"HELLO WORLD\n"
    assert transport.disconnecting


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_upper_accepts_both_line_endings(ending):
    protocol, transport = connect("upper")
    protocol.dataReceived(b"abc" + ending)
    assert transport.value() == b"ABC\n"


def test_upper_keep_open_answers_every_line_byte_at_a_time():
    protocol, transport = connect("upper", ServiceConfig(keepOpen=True))
    feed(protocol, b"one\r\ntwo\nthree\n", 1)
    assert transport.value() == b"ONE\nTWO\nTHREE\n"
    assert not transport.disconnecting
    protocol.readConnectionLost()
    assert transport.disconnecting


def test_upper_changes_only_ascii_letters():
    line = "straße 123 ÿ".encode() + bytes(range(0x80, 0x100))
    protocol, transport = connect("upper")
    protocol.dataReceived(line + b"\n")
    assert transport.value() == "STRAßE 123 ÿ".encode() + bytes(range(0x80, 0x100)) + b"\n"


def test_upper_last_line_without_ending_is_answered_at_half_close():
    protocol, transport = connect("upper")
    protocol.dataReceived(b"no newline")
    assert transport.value() == b""
    protocol.readConnectionLost()
    assert transport.value() == b"NO NEWLINE\n"
    assert transport.disconnecting


def test_upper_line_at_the_limit_is_answered():
    protocol, transport = connect("upper", ServiceConfig(maxLine=10))
    feed(protocol, b"a" * 10 + b"\r\n", 1)
    assert transport.value() == b"A" * 10 + b"\n"


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_upper_line_over_the_limit_gets_one_error_line_and_closes(chunk):
    protocol, transport = connect("upper", ServiceConfig(maxLine=10))
    feed(protocol, b"a" * 50 + b"\n" + b"b\n", chunk)
    assert transport.value() == b"error: line longer than 10 bytes\n"
    assert transport.disconnecting


def test_upper_huge_line_byte_at_a_time_default_limit():
    """64 KiB + 2 bytes fed one at a time: the error comes as soon as the limit is passed."""
    protocol, transport = connect("upper")
    feed(protocol, b"x" * (64 * 1024 + 2), 1)
    assert transport.value() == b"error: line longer than 65536 bytes\n"
    assert len(protocol._buffer) == 0


def test_upper_huge_line_within_limit_in_one_chunk():
    protocol, transport = connect("upper")
    protocol.dataReceived(b"y" * 65536 + b"\n")
    assert transport.value() == b"Y" * 65536 + b"\n"


def test_sink_logs_every_message_with_peer_and_sends_nothing(logged):
    protocol, transport = connect("sink")
    protocol.dataReceived(b"Half a league, half a league ... ")
    protocol.dataReceived(b"\xff\xfe\x00binary\n\x1b[2J")
    protocol.readConnectionLost()
    protocol.connectionLost(None)
    assert transport.value() == b""
    assert transport.disconnecting
    assert texts(logged) == [
        "192.0.2.7:40000 -->Half a league, half a league ... ",
        "192.0.2.7:40000 -->\\xff\\xfe\\x00binary\\n\\x1b[2J",
        "192.0.2.7:40000 Ending connection",
    ]


def test_ack_logs_message_and_replies_like_the_tutorials_server(logged):
    protocol, transport = connect("ack")
    protocol.dataReceived(b"Hello there\n")
    assert transport.value() == ACK_REPLY == b"I got your message"
    assert transport.disconnecting
    assert texts(logged) == ["192.0.2.7:40000 Here is the message: Hello there"]


def test_ack_answers_one_message_even_with_keep_open(logged):
    protocol, transport = connect("ack", ServiceConfig(keepOpen=True))
    protocol.dataReceived(b"one\ntwo\n")
    assert transport.value() == ACK_REPLY
    assert transport.disconnecting
    assert len(texts(logged)) == 1


def test_ack_binary_message_is_logged_escaped(logged):
    protocol, transport = connect("ack")
    feed(protocol, b"\x00\x80\xc3(\r\n", 1)
    assert transport.value() == ACK_REPLY
    assert texts(logged) == ["192.0.2.7:40000 Here is the message: \\x00\\x80\\xc3("]


def test_ack_peer_that_sends_nothing_gets_nothing(logged):
    protocol, transport = connect("ack")
    protocol.readConnectionLost()
    assert transport.value() == b""
    assert transport.disconnecting
    assert texts(logged) == []


@pytest.mark.parametrize("name", sorted(SERVICES))
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_binary_never_raises(name, chunk, logged):
    """Every byte value, in any chunking, then half-close: no exception, and a sane close."""
    data = bytes(range(256)) * 300
    protocol, transport = connect(name, ServiceConfig(maxLine=1000))
    feed(protocol, data, chunk)
    protocol.readConnectionLost()
    assert transport.disconnecting


class HalfClosing(StringTransport):
    """A socket transport seen from a service: it can shut down its sending side."""

    writingClosed = False
    aborted = False

    def closeWriting(self) -> bool:
        self.writingClosed = True
        return True

    def abortConnection(self) -> None:
        self.aborted = True


def connectHalfClosing(name: str, config: ServiceConfig = ServiceConfig()):
    protocol = ServiceFactory(name, config).buildProtocol(PEER)
    transport = HalfClosing(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize("name", ["upper", "ack"])
def test_input_left_unread_is_drained_after_the_reply_not_reset(name, logged):
    """
    Closing a socket with unread input resets it and loses the reply's tail:
    the sending side is shut down instead, and input dropped until the peer closes.
    """
    protocol, transport = connectHalfClosing(name)
    protocol.dataReceived(b"one\ntwo\n")
    assert transport.writingClosed and not transport.disconnecting
    assert protocol.lineWaiting()  # the line deadline bounds the wait
    protocol.dataReceived(b"three\n" * 1000)
    assert not transport.aborted
    protocol.readConnectionLost()
    assert transport.disconnecting
    assert transport.value() == (b"ONE\n" if name == "upper" else ACK_REPLY)


def test_a_line_too_long_is_answered_then_the_rest_drained():
    protocol, transport = connectHalfClosing("upper", ServiceConfig(maxLine=10))
    protocol.dataReceived(b"x" * 100)
    assert transport.value() == b"error: line longer than 10 bytes\n"
    assert transport.writingClosed and not transport.disconnecting


def test_a_peer_that_keeps_sending_while_the_server_closes_is_cut_off():
    protocol, transport = connectHalfClosing("upper")
    protocol.dataReceived(b"one\nmore")
    chunk = b"y" * 65536
    for _ in range(protocol.DISCARD_LIMIT // len(chunk)):
        protocol.dataReceived(chunk)
        assert not transport.aborted
    protocol.dataReceived(chunk)
    assert transport.aborted


def test_nothing_left_unread_closes_at_once():
    protocol, transport = connectHalfClosing("upper")
    protocol.dataReceived(b"one\n")
    assert transport.disconnecting and not transport.writingClosed


def test_without_a_half_closeable_transport_the_close_is_as_usual():
    protocol, transport = connect("upper")  # StringTransport: no closeWriting
    protocol.dataReceived(b"one\ntwo\n")
    assert transport.disconnecting
