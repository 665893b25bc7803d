"""
twistsock's TCP port and transport (twistsock._tcp), on the twistsock reactor:
real sockets on loopback, clients from Python's socket module, the reactor
driven by hand one pass at a time.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from twistsock import _tcp
from twistsock._direct import loseDirectly, writeDirectly
from twistsock.reactor import TwistsockReactor


class Counting(TwistsockReactor):
    """Remembers every socket registered for reading, other than listening ports."""

    def __init__(self) -> None:
        self.registered: list[object] = []
        super().__init__()

    def addReader(self, reader: object) -> None:
        if isinstance(reader, tcp.Server):
            self.registered.append(reader)
        super().addReader(reader)


@pytest.fixture
def reactor():
    reactor = Counting()
    yield reactor
    for port in list(reactor.getReaders()):
        if isinstance(port, tcp.Port):
            port.connectionLost(None)
    reactor.removeAll()
    reactor.waker.connectionLost(None)
    reactor._poller.close()


class Recorder(Protocol):
    """Keeps what it receives and how it ended; every instance is kept by its class."""

    made: list[Recorder] = []

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[object] = []
        Recorder.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.append(reason)


class Answers(Recorder):
    """Replies to the first bytes and closes, as upper and ack do."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        writeDirectly(self.transport, data.upper())
        loseDirectly(self.transport)


class PausesAtOnce(Recorder):
    def connectionMade(self) -> None:
        self.transport.pauseProducing()


class ClosesAtOnce(Recorder):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class PausesWhenItReads(Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()


class Explodes(Recorder):
    def dataReceived(self, data: bytes) -> None:
        raise ValueError("boom")


@implementer(IHalfCloseableProtocol)
class HalfCloses(Recorder):
    inputEnded = False

    def readConnectionLost(self) -> None:
        self.inputEnded = True
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fresh():
    Recorder.made = []
    yield


def listen(reactor, protocol, interface="127.0.0.1"):
    return reactor.listenTCP(0, Factory.forProtocol(protocol), interface=interface)


def run(reactor, until, passes=200):
    """Run reactor passes until C{until()} is true (a bounded number of them)."""
    for _ in range(passes):
        if until():
            return
        reactor.doPoll(0.01)
    assert until(), "not reached within the passes allowed"


def ended(reactor):
    """Run until the one connection made so far has ended; its protocol."""
    run(reactor, lambda: Recorder.made and Recorder.made[0].lost)
    (protocol,) = Recorder.made
    return protocol


def client(port, family=socket.AF_INET, host="127.0.0.1"):
    c = socket.socket(family, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect((host, port.getHost().port))
    return c


def drain(sock):
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_the_twistsock_reactor_listens_with_twistsocks_port(reactor):
    port = listen(reactor, Recorder)
    assert isinstance(port, _tcp.Port)
    c = client(port)
    c.sendall(b"x")
    run(reactor, lambda: Recorder.made and Recorder.made[0].received)
    transport = Recorder.made[0].transport
    assert isinstance(transport, _tcp.Server) and ITCPTransport.providedBy(transport)
    host, peer = c.getsockname(), c.getpeername()
    assert transport.getPeer() == IPv4Address("TCP", *host)
    assert transport.getHost() == IPv4Address("TCP", *peer)
    c.close()


def test_bytes_waiting_at_accept_are_read_at_once_and_an_answer_never_registers(reactor):
    port = listen(reactor, Answers)
    c = client(port)
    c.sendall(b"hello\n")
    protocol = ended(reactor)
    assert protocol.received == [b"hello\n"]
    assert protocol.lost[0].check(ConnectionDone)
    assert reactor.registered == []  # read, answered and closed without epoll
    assert drain(c) == b"HELLO\n"
    c.close()


def test_a_connection_with_nothing_waiting_is_registered_and_read_later(reactor):
    port = listen(reactor, Recorder)
    c = client(port)
    run(reactor, lambda: Recorder.made)
    (protocol,) = Recorder.made
    assert protocol.received == [] and reactor.registered == [protocol.transport]
    c.sendall(b"later")
    run(reactor, lambda: protocol.received)
    assert protocol.received == [b"later"]
    c.close()
    run(reactor, lambda: protocol.lost)
    assert protocol.lost[0].check(ConnectionDone)


def test_a_protocol_that_pauses_in_connection_made_is_not_read_until_it_resumes(reactor):
    port = listen(reactor, PausesAtOnce)
    c = client(port)
    c.sendall(b"wait")
    run(reactor, lambda: Recorder.made)
    for _ in range(5):
        reactor.doPoll(0.01)
    (protocol,) = Recorder.made
    assert protocol.received == [] and reactor.registered == []
    protocol.transport.resumeProducing()
    run(reactor, lambda: protocol.received)
    assert protocol.received == [b"wait"]
    c.close()


def test_a_protocol_that_pauses_while_it_reads_is_not_registered(reactor):
    port = listen(reactor, PausesWhenItReads)
    c = client(port)
    c.sendall(b"one")
    run(reactor, lambda: Recorder.made and Recorder.made[0].received)
    (protocol,) = Recorder.made
    c.sendall(b"two")
    for _ in range(5):
        reactor.doPoll(0.01)
    assert protocol.received == [b"one"] and reactor.registered == []
    protocol.transport.resumeProducing()
    run(reactor, lambda: len(protocol.received) == 2)
    assert protocol.received == [b"one", b"two"]
    c.close()


def test_a_protocol_that_closes_in_connection_made_is_not_read(reactor):
    port = listen(reactor, ClosesAtOnce)
    c = client(port)
    c.sendall(b"ignored")
    protocol = ended(reactor)
    assert protocol.received == []
    assert protocol.lost[0].check(ConnectionDone)
    c.close()


def test_an_error_in_the_first_read_is_logged_with_the_transports_prefix_and_closes(reactor):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        port = listen(reactor, Explodes)
        c = client(port)
        c.sendall(b"boom")
        ended(reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (protocol,) = Recorder.made
    assert protocol.lost[0].check(ValueError)
    (failure,) = [e for e in events if e.get("isError")]
    assert failure["failure"].check(ValueError)
    assert failure["system"] == "Explodes,0,127.0.0.1"
    c.close()


def test_a_client_gone_before_the_accept_is_a_clean_close(reactor):
    port = listen(reactor, Recorder)
    c = client(port)
    c.close()
    protocol = ended(reactor)
    assert protocol.received == [] and protocol.lost[0].check(ConnectionDone)


def test_a_half_close_waiting_at_accept_reaches_a_half_closeable_protocol(reactor):
    port = listen(reactor, HalfCloses)
    c = client(port)
    c.sendall(b"last words")
    c.shutdown(socket.SHUT_WR)
    protocol = ended(reactor)
    assert protocol.received == [b"last words"] and protocol.inputEnded
    assert drain(c) == b"bye"
    c.close()


def test_the_log_prefix_and_repr_are_made_when_asked_for(reactor):
    port = listen(reactor, Recorder)
    c = client(port)
    run(reactor, lambda: Recorder.made)
    transport = Recorder.made[0].transport
    assert transport._logstr is None and transport._repstr is None
    assert transport.logPrefix() == "Recorder,0,127.0.0.1"
    assert repr(transport) == f"<Recorder #0 on {port.getHost().port}>"
    c.close()
    run(reactor, lambda: Recorder.made[0].lost)
    assert transport.logPrefix() == "Recorder,0,127.0.0.1"  # still, once closed


def test_ipv6_peers_keep_their_address_type(reactor):
    try:
        port = listen(reactor, Answers, interface="::1")
    except Exception:
        pytest.skip("no IPv6 loopback")
    c = client(port, socket.AF_INET6, "::1")
    c.sendall(b"six\n")
    protocol = ended(reactor)
    peer = protocol.transport.getPeer()
    assert isinstance(peer, IPv6Address) and peer.host == "::1"
    assert peer.port == c.getsockname()[1]
    assert drain(c) == b"SIX\n"
    c.close()


def test_many_connections_waiting_at_once_are_all_answered(reactor):
    port = listen(reactor, Answers)
    clients = [client(port) for _ in range(50)]
    for i, c in enumerate(clients):
        c.sendall(b"n%d\n" % i)
    run(reactor, lambda: len(Recorder.made) == 50 and all(p.lost for p in Recorder.made))
    for i, c in enumerate(clients):
        assert drain(c) == b"N%d\n" % i
        c.close()
    assert port.numberAccepts >= 1


class AnswersAndLooksBack(Answers):
    """Answers, and notes whether every connection before it was closed already."""

    def dataReceived(self, data: bytes) -> None:
        self.earlierClosed = all(p.lost for p in Recorder.made if p is not self)
        super().dataReceived(data)


def test_a_connection_answered_at_accept_is_closed_before_the_port_takes_the_next(reactor):
    port = listen(reactor, AnswersAndLooksBack)
    clients = [client(port) for _ in range(5)]
    for c in clients:
        c.sendall(b"x\n")
    run(reactor, lambda: len(Recorder.made) == 5 and all(p.lost for p in Recorder.made))
    # All five were taken in one pass of the port (they were all waiting), and
    # each found the ones before it closed: not held open to the end of the pass.
    assert [p.earlierClosed for p in Recorder.made] == [True] * 5
    for c in clients:
        assert drain(c) == b"X\n"
        c.close()


def test_an_adopted_tcp_socket_gets_twistsocks_port_and_a_unix_one_twisteds(reactor, tmp_path):
    from twisted.internet import unix

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(5)
    listening.setblocking(False)
    port = reactor.adoptStreamPort(listening.fileno(), socket.AF_INET, Factory.forProtocol(Answers))
    listening.close()  # the port has its own copy (IReactorSocket's contract)
    assert isinstance(port, _tcp.Port)
    c = client(port)
    c.sendall(b"adopted\n")
    ended(reactor)
    assert drain(c) == b"ADOPTED\n"
    c.close()

    path = str(tmp_path / "s")
    unixListening = socket.socket(socket.AF_UNIX)
    unixListening.bind(path)
    unixListening.listen(5)
    unixListening.setblocking(False)
    unixPort = reactor.adoptStreamPort(
        unixListening.fileno(), socket.AF_UNIX, Factory.forProtocol(Recorder)
    )
    unixListening.close()
    assert type(unixPort) is unix.Port
    unixPort.connectionLost(None)
