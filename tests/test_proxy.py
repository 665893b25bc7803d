"""The PROXY protocol reader behind proxy:, on memory transports."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twistsock.proxy import V2_SIGNATURE, InvalidHeader, ProxyHeaderProtocol, parseHeader

V1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 51000 5000\r\n"


def v2(command=0x21, family=0x11, body=None, tlv=b""):
    if body is None:
        body = (
            socket.inet_aton("192.0.2.10")
            + socket.inet_aton("127.0.0.1")
            + struct.pack("!HH", 51000, 5000)
        )
    body += tlv
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def test_v1_tcp4():
    assert parseHeader(V1 + b"rest") == (
        len(V1),
        IPv4Address("TCP", "192.0.2.10", 51000),
        IPv4Address("TCP", "127.0.0.1", 5000),
    )


def test_v1_tcp6_and_unknown():
    header = b"PROXY TCP6 2001:db8::1 ::1 51000 5000\r\n"
    assert parseHeader(header) == (
        len(header),
        IPv6Address("TCP", "2001:db8::1", 51000),
        IPv6Address("TCP", "::1", 5000),
    )
    assert parseHeader(b"PROXY UNKNOWN\r\n") == (15, None, None)
    assert parseHeader(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n")[1:] == (None, None)


def test_v2_inet_inet6_unix_local():
    assert parseHeader(v2()) == (
        28,
        IPv4Address("TCP", "192.0.2.10", 51000),
        IPv4Address("TCP", "127.0.0.1", 5000),
    )
    body6 = (
        socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        + socket.inet_pton(socket.AF_INET6, "::1")
        + struct.pack("!HH", 1, 2)
    )
    assert parseHeader(v2(family=0x21, body=body6))[1] == IPv6Address("TCP", "2001:db8::1", 1)
    bodyUnix = b"/tmp/client".ljust(108, b"\0") + b"/tmp/server".ljust(108, b"\0")
    assert parseHeader(v2(family=0x31, body=bodyUnix))[1:] == (
        UNIXAddress(b"/tmp/client"),
        UNIXAddress(b"/tmp/server"),
    )
    # LOCAL (a health check from the proxy itself): the connection's own addresses.
    assert parseHeader(v2(command=0x20, family=0x00, body=b"")) == (16, None, None)


def test_v2_tlvs_are_skipped():
    header = v2(tlv=b"\x05\x00\x04abcd")
    assert parseHeader(header + b"data")[0] == len(header)


@pytest.mark.parametrize("header", [V1, v2()])
def test_incomplete_headers_ask_for_more(header):
    for end in range(len(header)):
        assert parseHeader(header[:end]) is None, end


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n",
        b"PROXZ TCP4",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 " + b"1" * 200,
        V2_SIGNATURE[:5] + b"X",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12,  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4,  # address block too short
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello, no header
    ],
)
def test_invalid_headers(data):
    with pytest.raises(InvalidHeader):
        parseHeader(data)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self):
        self.events = []

    def connectionMade(self):
        self.events.append(("made", self.transport.getPeer()))

    def dataReceived(self, data):
        self.events.append(("data", data))

    def readConnectionLost(self):
        self.events.append(("eof",))

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.events.append(("lost",))


def connect(wrapped=None):
    wrapped = wrapped or Recorder()
    protocol = ProxyHeaderProtocol(wrapped)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    return protocol, wrapped, transport


@pytest.mark.parametrize("header", [V1, v2()])
def test_header_byte_at_a_time_then_the_real_peer_from_connection_made(header):
    protocol, wrapped, transport = connect()
    for i in range(len(header)):
        assert wrapped.events == []
        protocol.dataReceived(header[i : i + 1])
    protocol.dataReceived(b"hello")
    assert wrapped.events == [("made", IPv4Address("TCP", "192.0.2.10", 51000)), ("data", b"hello")]
    assert protocol.getHost() == IPv4Address("TCP", "127.0.0.1", 5000)


def test_header_and_data_in_one_chunk():
    protocol, wrapped, _ = connect()
    protocol.dataReceived(V1 + b"payload")
    assert wrapped.events[1] == ("data", b"payload")


def test_local_keeps_the_connection_addresses():
    protocol, wrapped, _ = connect()
    protocol.dataReceived(v2(command=0x20, family=0x00, body=b""))
    assert wrapped.events == [("made", IPv4Address("TCP", "127.0.0.1", 40000))]


def test_no_header_is_refused_logged_once_and_never_reaches_the_service():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        protocol, wrapped, transport = connect()
        protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert wrapped.events == []
    assert transport.disconnecting
    assert [formatEvent(e) for e in observer] == [
        "127.0.0.1:40000 refused: no PROXY signature (first bytes: GET / HTTP/1.0\\r\\n\\r\\n)"
    ]


def test_half_close_passes_through_after_the_header():
    protocol, wrapped, transport = connect()
    protocol.dataReceived(V1)
    protocol.readConnectionLost()
    assert wrapped.events[-1] == ("eof",)
    assert not transport.disconnecting


def test_eof_before_the_header_closes():
    protocol, wrapped, transport = connect()
    protocol.dataReceived(b"PROXY TCP4")
    protocol.readConnectionLost()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert wrapped.events == []


def test_writes_and_producer_calls_reach_the_transport():
    protocol, wrapped, transport = connect()
    protocol.dataReceived(V1)
    wrapped.transport.write(b"out")
    wrapped.transport.registerProducer(wrapped.transport, True)
    assert transport.value() == b"out"
    assert transport.producer is protocol


# -- one client, one address, whatever the header's form --


def test_an_ipv4_mapped_client_is_the_same_client_from_v1_and_v2():
    from twistsock._format import describe

    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.77")
    here = socket.inet_pton(socket.AF_INET6, "::1")
    _, fromV2, _ = parseHeader(v2(family=0x21, body=mapped + here + struct.pack("!HH", 1, 2)))
    _, fromV1, _ = parseHeader(b"PROXY TCP6 ::ffff:192.0.2.77 ::1 1 2\r\n")
    _, fromV1Hex, _ = parseHeader(b"PROXY TCP6 ::ffff:c000:24d ::1 1 2\r\n")
    assert fromV2 == fromV1 == fromV1Hex == IPv4Address("TCP", "192.0.2.77", 1)
    assert describe(fromV1Hex) == "192.0.2.77:1"


def test_a_scope_in_a_v1_header_is_dropped():
    _, peer, _ = parseHeader(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n")
    assert peer == IPv6Address("TCP", "fe80::1", 1)


def test_control_characters_in_a_v2_unix_path_never_reach_a_log_line_raw():
    from twistsock._format import describe

    hostile = b"/tmp/\x1b[31mred\nforged line\x00"
    body = hostile.ljust(108, b"\0") + b"/srv/sock".ljust(108, b"\0")
    _, peer, _ = parseHeader(v2(family=0x31, body=body))
    text = describe(peer)
    assert text == "unix:/tmp/\\x1b[31mred\\nforged line"
    assert text.isprintable()
