"""
TLS without waiting for the reactor (twistsock._tlsdirect.DirectTLSProtocol): the
server side runs over a StringTransport, the client is a pyOpenSSL memory-BIO
connection pumped by hand, so no reactor runs and every byte is seen.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet import reactor as globalReactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

import twistsock._tlsdirect
from twistsock import certs
from twistsock._tlsdirect import DirectTLSProtocol, useDirectTLS
from twistsock.connection import ConnectionFactory, transportOf
from twistsock.listen import ListeningService, ListenSpec
from twistsock.services import ServiceFactory
from twistsock.tls import privateCertificate


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return certs.generate(tmp_path_factory.mktemp("certs"))


class Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class App(Protocol):
    """Records what it gets and does what the test asks on each delivery."""

    def __init__(self, onData=None) -> None:
        self.received: list[bytes] = []
        self.onData = onData
        self.lost = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.onData:
            self.onData(self.transport, data)

    def connectionLost(self, reason=None) -> None:
        self.lost.append(reason)


class Session:
    """A TLS server protocol over a Writes transport, and a pyOpenSSL client talking to it."""

    def __init__(self, material, app: App, protocol=DirectTLSProtocol) -> None:
        self.clock = Clock()
        options = privateCertificate(str(material.server)).options()
        factory = TLSMemoryBIOFactory(
            options, False, Factory.forProtocol(lambda: app), clock=self.clock
        )
        factory.protocol = protocol
        self.server = factory.buildProtocol(None)
        self.transport = Writes()
        self.server.makeConnection(self.transport)
        self.app = app
        self.closed = False
        self.client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.client.set_connect_state()
        for _ in range(10):
            try:
                self.client.do_handshake()
                break
            except SSL.WantReadError:
                self.toServer(self.fromClient())
                self.toClient()
        else:
            raise AssertionError("no handshake")
        self.toServer(self.fromClient())  # the client's Finished
        self.toClient()  # session tickets
        self.transport.writes.clear()

    def fromClient(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.client.bio_read(65536)
            except SSL.WantReadError:
                return out

    def toServer(self, data: bytes) -> None:
        if data:
            self.server.dataReceived(data)

    def toClient(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.client.bio_write(data)

    def send(self, *messages: bytes) -> bytes:
        """Encrypt each message as its own record; return the records, unsent."""
        for message in messages:
            self.client.sendall(message)
        return self.fromClient()

    def received(self) -> bytes:
        """Everything the client can decrypt now; C{closed} is set once close_notify came."""
        self.toClient()
        out = b""
        while True:
            try:
                out += self.client.recv(65536)
            except SSL.WantReadError:
                return out
            except SSL.ZeroReturnError:
                self.closed = True
                return out


def records(data: bytes) -> list[int]:
    """The types of the TLS records in data."""
    kinds = []
    while data:
        kinds.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return kinds


def test_replies_written_while_delivering_leave_as_one_record_after_delivery(material):
    def reply(transport, data):
        for part in (b"one ", b"two ", b"three"):
            transport.write(part)
        assert session.transport.writes == []  # held until the delivery ends

    session = Session(material, App(reply))
    session.toServer(session.send(b"go"))
    assert len(session.transport.writes) == 1
    assert records(session.transport.writes[0]) == [23]  # one application-data record
    assert session.received() == b"one two three"


@pytest.mark.parametrize(
    "protocol, waits", [(DirectTLSProtocol, False), (BufferingTLSTransport, True)]
)
def test_a_write_outside_delivery_is_encrypted_and_handed_on_at_once(material, protocol, waits):
    # Twisted's default waits for the next reactor pass (clock.advance(0)): the control.
    session = Session(material, App(), protocol)
    session.app.transport.write(b"unprompted")
    assert (session.transport.value() == b"") is waits
    session.clock.advance(0)
    assert session.received() == b"unprompted"


def test_close_while_delivering_sends_the_held_reply_before_close_notify(material):
    def replyAndClose(transport, data):
        transport.write(b"bye")
        transport.loseConnection()

    session = Session(material, App(replyAndClose))
    session.toServer(session.send(b"quit"))
    assert session.received() == b"bye"
    assert session.closed
    session.client.shutdown()  # the client's close_notify in reply: now TCP closes
    session.toServer(session.fromClient())
    assert session.transport.disconnecting


def test_writes_after_close_are_dropped_as_twisted_drops_them(material):
    def closeThenWrite(transport, data):
        transport.loseConnection()
        transport.write(b"late")

    session = Session(material, App(closeThenWrite))
    session.toServer(session.send(b"x"))
    assert session.received() == b""
    assert session.closed


def test_abort_while_delivering_discards_the_held_reply(material):
    def replyAndAbort(transport, data):
        transport.write(b"never")
        transport.abortConnection()

    session = Session(material, App(replyAndAbort))
    session.toServer(session.send(b"x"))
    assert session.received() == b""
    assert session.transport.disconnecting


@pytest.fixture(params=["BIO size read", "BIO size unknown"])
def bioSize(request, monkeypatch):
    """Both ways of finding a BIO empty: its size, or pyOpenSSL's WantReadError."""
    if request.param == "BIO size unknown":
        monkeypatch.setattr(twistsock._tlsdirect, "_memoryBIOSize", None)


def test_several_records_in_one_read_are_all_delivered(material, bioSize):
    # Six records (20,000 bytes make two): a loop that stopped too early
    # would leave some undelivered until the next read.
    session = Session(material, App(lambda transport, data: transport.write(data.upper())))
    session.toServer(session.send(b"a", b"b", b"c" * 20000, b"d"))
    assert b"".join(session.app.received) == b"ab" + b"c" * 20000 + b"d"
    assert session.received() == b"AB" + b"C" * 20000 + b"D"


def test_a_record_longer_than_one_read_is_delivered_whole(material, monkeypatch):
    # OpenSSL keeps the rest of a record that did not fit the read (and the
    # BIO is empty by then): the loop must read again.
    monkeypatch.setattr(twistsock._tlsdirect, "_READ", 1000)
    session = Session(material, App())
    session.toServer(session.send(b"x" * 5000))
    assert b"".join(session.app.received) == b"x" * 5000


def test_a_record_cut_into_single_bytes_is_delivered_once_whole(material):
    session = Session(material, App(lambda transport, data: transport.write(data)))
    wire = session.send(b"hello, world")
    for i in range(len(wire)):
        session.toServer(wire[i : i + 1])
    assert session.app.received == [b"hello, world"]
    assert session.received() == b"hello, world"


def test_a_large_write_arrives_whole(material, bioSize):
    session = Session(material, App())
    payload = bytes(range(256)) * 4096  # 1 MiB
    session.app.transport.write(payload)
    assert session.received() == payload


def test_buffers_other_than_bytes(material):
    session = Session(material, App())
    with pytest.raises(TypeError):
        session.app.transport.write("text")
    session.app.transport.write(bytearray(b"ab"))
    session.app.transport.write(memoryview(b"cd"))
    assert session.received() == b"abcd"


def test_peer_close_notify_reaches_the_application(material):
    session = Session(material, App())
    session.client.shutdown()
    session.toServer(session.fromClient())
    session.server.connectionLost(None)  # what the TCP transport does once it is closed
    assert len(session.app.lost) == 1


@pytest.fixture
def ports():
    listening = []
    yield listening
    for port in listening:
        port.stopListening()


def listen(endpoint: str, ports: list, factory=None):
    d = serverFromString(globalReactor, endpoint).listen(factory or Factory.forProtocol(Protocol))
    port = []
    d.addCallback(port.append)
    ports.append(port[0])  # TCP listening is synchronous
    return port[0]


def tlsFactory(port):
    factory = port.factory
    while not isinstance(factory, TLSMemoryBIOFactory):
        factory = factory.wrappedFactory
    return factory


@pytest.mark.parametrize("kind", ["ssl", "mtls", "proxy:ssl", "tls"])
def test_every_tls_endpoint_gets_the_direct_protocol(material, ports, tmp_path, kind):
    key = material.server
    endpoint = {
        "ssl": f"ssl:0:interface=127.0.0.1:privateKey={key}",
        "mtls": f"mtls:0:interface=127.0.0.1:privateKey={key}:clientCA={material.ca}",
        "proxy:ssl": f"proxy:ssl:0:interface=127.0.0.1:privateKey={key}",
        "tls": f"tls:{key.parent}:port=0:interface=127.0.0.1",
    }[kind]
    if kind == "tls":
        (key.parent / "ca.pem").rename(
            tmp_path / "ca.pem"
        )  # Twisted's tls:DIR must not see the root
    try:
        port = listen(endpoint, ports)
    finally:
        if kind == "tls":
            (tmp_path / "ca.pem").rename(key.parent / "ca.pem")
    assert tlsFactory(port).protocol is BufferingTLSTransport
    assert useDirectTLS(port)
    assert tlsFactory(port).protocol is DirectTLSProtocol


def test_plain_ports_and_other_tls_protocols_are_left_alone(material, ports):
    assert not useDirectTLS(listen("tcp:0:interface=127.0.0.1", ports))
    port = listen(f"ssl:0:interface=127.0.0.1:privateKey={material.server}", ports)

    class Custom(BufferingTLSTransport):
        pass

    tlsFactory(port).protocol = Custom
    assert not useDirectTLS(port)
    assert tlsFactory(port).protocol is Custom


def test_the_listening_service_uses_it(material):
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={material.server}"
    factory = ConnectionFactory(ServiceFactory("echo"), transportOf(endpoint))
    service = ListeningService(
        ListenSpec("echo", endpoint), serverFromString(globalReactor, endpoint), factory, print
    )
    service.startService()
    try:
        assert tlsFactory(service.port).protocol is DirectTLSProtocol
    finally:
        service.stopService()
