"""
Property-based tests: random bytes in random chunkings (empty reads and
single bytes included) into every parser that reads from the network or
from the command line.  Each reply is compared with a model written from the
specification, not from the code; nothing may raise.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proxy import v2
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from twistsock._format import splitEndpoint, splitHostTarget
from twistsock.connection import ConnectionFactory, TransportInfo
from twistsock.listen import parseListen
from twistsock.proxy import InvalidHeader, ProxyHeaderProtocol, parseHeader
from twistsock.services import ACK_REPLY, DATAGRAM_SERVICES, ServiceConfig, ServiceFactory
from twistsock.udp import DatagramPolicy, DatagramServer

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 5000)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to the parsers turn up often: line endings, PROXY signatures.
interesting = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n", b"TCP4 ", b" ", b"\x00", b"\xff"]
)
payload = st.lists(st.one_of(st.binary(max_size=40), interesting), max_size=12).map(b"".join)


@st.composite
def chunkings(draw, data: bytes) -> list[bytes]:
    """C{data} cut at random places, with empty reads thrown in."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces, start = [], 0
    for cut in cuts + [len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


@st.composite
def chunked(draw, data_strategy=payload):
    data = draw(data_strategy)
    return data, draw(chunkings(data))


def serve(name: str, pieces: list[bytes], config: ServiceConfig, halfClose: bool):
    protocol = ConnectionFactory(ServiceFactory(name, config), TransportInfo("tcp")).buildProtocol(
        PEER
    )
    transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
    protocol.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break  # a closed connection reads nothing more
        protocol.dataReceived(piece)
    if halfClose and not transport.disconnecting:
        protocol.readConnectionLost()
    return transport.value(), transport.disconnecting


def tooLong(limit: int) -> bytes:
    return b"error: line longer than %d bytes\n" % limit


def modelLines(
    data: bytes, limit: int, reply, keepOpen: bool, halfClose: bool
) -> tuple[bytes, bool]:
    """What a line service sends and whether it closes, from the specification."""
    out = b""
    while True:
        end = data.find(b"\n")
        if end < 0:
            break
        line, data = data[:end], data[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            return out + tooLong(limit), True
        out += reply(line)
        if not keepOpen:
            return out, True
    # An unfinished line: too long already, or answered at half-close.
    if len(data) > limit + 1:
        return out + tooLong(limit), True
    if halfClose:
        if data:
            out += tooLong(limit) if len(data) > limit else reply(data)
        return out, True
    return out, False


@FUZZ
@given(chunked(), st.booleans())
def test_echo_sends_back_exactly_what_came(case, halfClose):
    data, pieces = case
    sent, closed = serve("echo", pieces, ServiceConfig(), halfClose)
    assert sent == data
    assert closed == halfClose


@FUZZ
@given(chunked(), st.integers(0, 30), st.booleans(), st.booleans())
def test_upper_answers_as_specified(case, limit, keepOpen, halfClose):
    data, pieces = case
    sent, closed = serve(
        "upper", pieces, ServiceConfig(maxLine=limit, keepOpen=keepOpen), halfClose
    )
    assert (sent, closed) == modelLines(
        data, limit, lambda line: line.upper() + b"\n", keepOpen, halfClose
    )


@FUZZ
@given(chunked(), st.integers(0, 30), st.booleans())
def test_ack_answers_one_line_as_specified(case, limit, halfClose):
    data, pieces = case
    sent, closed = serve("ack", pieces, ServiceConfig(maxLine=limit), halfClose)
    assert (sent, closed) == modelLines(data, limit, lambda line: ACK_REPLY, False, halfClose)


@FUZZ
@given(chunked(), st.booleans())
def test_sink_answers_nothing(case, halfClose):
    data, pieces = case
    sent, closed = serve("sink", pieces, ServiceConfig(), halfClose)
    assert sent == b""
    assert closed == halfClose


# -- the PROXY protocol header --


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data


octet = st.integers(0, 255)
address = st.tuples(
    st.tuples(octet, octet, octet, octet).map(lambda o: ".".join(map(str, o))),
    st.integers(1, 65535),
)


@st.composite
def headers(draw) -> tuple[bytes, str, int]:
    source, destination = draw(address), draw(address)
    if draw(st.booleans()):
        header = (
            f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
        )
    else:
        body = (
            socket.inet_aton(source[0])
            + socket.inet_aton(destination[0])
            + struct.pack("!HH", source[1], destination[1])
        )
        header = v2(body=body)
    return header, source[0], source[1]


@FUZZ
@given(st.binary(max_size=120))
def test_any_bytes_parse_or_are_refused_or_wait(data):
    try:
        parsed = parseHeader(data)
    except InvalidHeader:
        return
    if parsed is not None:
        length, peer, host = parsed
        assert 0 < length <= len(data)


@FUZZ
@given(st.data())
def test_a_valid_header_gives_the_same_peer_and_data_however_it_is_cut(data):
    header, sourceHost, sourcePort = data.draw(headers())
    rest = data.draw(payload)
    pieces = data.draw(chunkings(header + rest))
    wrapped = Collect()
    layer = ProxyHeaderProtocol(wrapped)
    transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
    layer.makeConnection(transport)
    for piece in pieces:
        layer.dataReceived(piece)
    assert not transport.disconnecting
    assert wrapped.made
    assert wrapped.data == rest
    peer = layer.getPeer()
    assert (peer.host, peer.port) == (sourceHost, sourcePort)


@FUZZ
@given(chunked(st.binary(max_size=200)))
def test_garbage_instead_of_a_header_is_refused_or_waited_for_never_passed_on(case):
    data, pieces = case
    wrapped = Collect()
    layer = ProxyHeaderProtocol(wrapped)
    transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
    layer.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break
        layer.dataReceived(piece)
    try:
        parsed = parseHeader(data)
    except InvalidHeader:
        parsed = "invalid"
    if parsed is None:
        assert not transport.disconnecting and not wrapped.made  # still waiting for the rest
    elif parsed == "invalid":
        assert transport.disconnecting and not wrapped.made
    else:
        assert wrapped.made and wrapped.data == data[parsed[0] :]


# -- datagrams --


@FUZZ
@given(
    st.sampled_from(sorted(DATAGRAM_SERVICES)),
    st.binary(max_size=300),
    st.integers(1, 65535),
    st.booleans(),
)
def test_every_datagram_service_answers_or_drops_and_never_raises(name, data, port, truncated):
    server = DatagramServer(
        name, DATAGRAM_SERVICES[name], DatagramPolicy(rate=0), clock=lambda: 0.0
    )
    reply = server.handle(data, "192.0.2.7", port, truncated)
    assert reply is None or len(reply) <= max(len(data), 1) * server.policy.amplification
    if name == "echo" and reply is not None:
        assert reply == data
    assert sum(server.counts.values()) == (0 if reply is not None else 1)


# -- the command line --


@FUZZ
@given(st.text(max_size=60))
def test_any_listen_argument_parses_or_is_a_value_error(text):
    try:
        spec = parseListen(text)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert spec.service and spec.endpoint


@FUZZ
@given(
    st.lists(
        st.text(alphabet=st.sampled_from(list("ab:\\=[]")), max_size=8), min_size=1, max_size=6
    )
)
def test_endpoint_fields_survive_escaping_and_splitting(fields):
    escaped = ":".join(f.replace("\\", "\\\\").replace(":", "\\:") for f in fields)
    assert splitEndpoint(escaped) == fields


@FUZZ
@given(st.text(max_size=40))
def test_any_client_target_parses_or_is_a_value_error(text):
    try:
        scheme, host, port, options = splitHostTarget("tcp:" + text)
    except ValueError as e:
        assert str(e)
    else:
        assert host and 0 < port < 65536
