"""
What a stalled TLS handshake holds (twistsock._tlsdirect): no OpenSSL
connection until the client's whole ClientHello has come, the same answers
as before for clients that stop or close early, and the heap trimmed after a
burst.  Unit tests run the server protocol over a StringTransport with a
pyOpenSSL client pumped by hand; the others run `twist sockets` and Python's
ssl module.
"""

from __future__ import annotations

import gc
import shutil
import socket
import ssl
import tempfile
import time
import weakref
from pathlib import Path

import pytest
from conftest import WAIT
from OpenSSL import SSL
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from twistsock import certs
from twistsock._tlsdirect import NOT_TLS_ALERT, ClientHello, DirectTLSProtocol, HeapTrimmer
from twistsock.tls import ServerTLS, loadIdentity, serverContext

#: OpenSSL's fatal decode_error alert: its answer to a stream that ends inside a handshake.
ALERT = b"\x15\x03\x03\x00\x02\x02\x32"


@pytest.fixture(scope="module")
def material():
    directory = Path(tempfile.mkdtemp(prefix="ts-tlsmem-"))
    try:
        yield certs.generate(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class App(Protocol):
    """Records what it gets; writes C{greeting} when connected."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost.append(reason)


class Server:
    """A server protocol as twistsock's TLS ports make it, over a StringTransport."""

    def __init__(
        self,
        material,
        app: App | None = None,
        protocol: type = DirectTLSProtocol,
        heap: HeapTrimmer | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.app = app or App()
        self.clock = clock or Clock()
        creator = ServerTLS(serverContext(loadIdentity(str(material.server))))
        factory = TLSMemoryBIOFactory(
            creator, False, Factory.forProtocol(lambda: self.app), clock=self.clock
        )
        factory.protocol = protocol
        self.protocol = factory.buildProtocol(None)
        if heap is not None:
            self.protocol.heap = heap
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data


def client(groups: bytes | None = None) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if groups is not None:
        assert SSL._lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    return connection


def pending(connection: SSL.Connection) -> bytes:
    """What the client has to send now (its next flight, or records)."""
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    out = b""
    while True:
        try:
            out += connection.bio_read(65536)
        except SSL.WantReadError:
            return out


def finish(server: Server, peer: SSL.Connection) -> None:
    """Run the handshake to its end (the ClientHello already went)."""
    for _ in range(10):
        peer.bio_write(server.take())
        try:
            peer.do_handshake()
        except SSL.WantReadError:
            continue
        server.protocol.dataReceived(pending(peer))
        return
    raise AssertionError("no handshake")


def echoed(server: Server, peer: SSL.Connection, data: bytes) -> bytes:
    peer.sendall(data)
    server.protocol.dataReceived(pending(peer))
    peer.bio_write(server.take())
    return peer.recv(65536)


def records(body: bytes, size: int) -> bytes:
    """A handshake message cut into handshake records of C{size} bytes."""
    return b"".join(
        b"\x16\x03\x01" + len(body[i : i + size]).to_bytes(2, "big") + body[i : i + size]
        for i in range(0, len(body), size)
    )


# -- no OpenSSL connection until the ClientHello is whole ---------------------------


@pytest.mark.parametrize("groups", [b"X25519", b"X25519MLKEM768"])
def test_a_client_holds_no_openssl_connection_until_its_client_hello_is_whole(material, groups):
    heap = HeapTrimmer(None)
    server = Server(material, heap=heap)
    assert server.protocol.getHandle() is None
    peer = client(groups)
    hello = pending(peer)
    for byte in range(len(hello) - 1):
        server.protocol.dataReceived(hello[byte : byte + 1])
        assert server.protocol.getHandle() is None
    assert server.transport.value() == b"" and heap.live == 0
    server.protocol.dataReceived(hello[-1:])
    assert server.protocol.getHandle() is not None and heap.live == 1
    assert server.transport.value()[:1] == b"\x16"  # the server's flight
    finish(server, peer)
    assert echoed(server, peer, b"after a slow hello") == b"after a slow hello"
    assert server.app.lost == []


def test_a_client_hello_in_many_records_is_held_whole_and_served(material):
    server = Server(material)
    peer = client()
    hello = pending(peer)
    cut = records(hello[5:], 100)
    server.protocol.dataReceived(cut[:-1])
    assert server.protocol.getHandle() is None
    server.protocol.dataReceived(cut[-1:])
    assert server.protocol.getHandle() is not None
    finish(server, peer)
    assert echoed(server, peer, b"x") == b"x"


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x16\x02\x00",
        b"\x17\x03\x03\x00\x01",
        b"\x16\x03\x01\x00\x05\x02",
        b"\x16\x03\x01\x40\x01",
    ],
    ids=["http", "version 2", "not a handshake record", "not a client hello", "record too long"],
)
def test_bytes_that_cannot_start_a_client_hello_go_to_openssl_at_once(material, first):
    server = Server(material)
    server.protocol.dataReceived(first)
    assert server.protocol.getHandle() is not None
    twisted = Server(material, protocol=BufferingTLSTransport)
    twisted.protocol.dataReceived(first)
    # Not a TLS record at all: a protocol_version alert first, where OpenSSL says nothing.
    alert = NOT_TLS_ALERT if first[:1] != b"\x16" else b""
    assert server.transport.value() == alert + twisted.transport.value()
    assert server.transport.disconnecting == twisted.transport.disconnecting


def test_the_client_hello_reader_holds_at_most_a_record():
    hello = ClientHello()
    assert all(
        hello.add(b"\x16\x03\x01\x00\x00") for _ in range(ClientHello.HOLD // 5)
    )  # empty records
    assert not hello.add(b"\x16\x03\x01\x00\x00")  # past HOLD: OpenSSL's
    big = (
        b"\x16\x03\x01\x40\x00" + b"\x01\x00\x40\x00" + bytes(2**14 - 4)
    )  # a record that holds part of a 16 KiB ClientHello
    hello = ClientHello()
    assert hello.add(big) and not hello.add(b"\x16")


@pytest.mark.parametrize("cut", [0, 1, 5, 6, 150])
def test_a_client_that_closes_early_gets_what_twisted_gives_it(material, cut):
    hello = pending(client())[:cut]
    server = Server(material)
    if hello:
        server.protocol.dataReceived(hello)
    server.protocol.readConnectionLost()  # the client's FIN
    server.protocol.connectionLost(Failure(ConnectionDone()))
    twisted = Server(
        material, protocol=BufferingTLSTransport
    )  # Twisted's own TLS, which is not half-closeable
    if hello:
        twisted.protocol.dataReceived(hello)
    twisted.protocol.connectionLost(Failure(ConnectionDone()))
    assert server.transport.value() == twisted.transport.value() == ALERT
    assert (
        [type(r.value) for r in server.app.lost]
        == [type(r.value) for r in twisted.app.lost]
        == [ConnectionLost]
    )


@pytest.mark.parametrize("cut", [0, 6])
@pytest.mark.parametrize("how", ["reset", "aborted", "closed by the server"])
def test_a_connection_lost_before_the_client_hello_tells_the_service_what_twisted_tells_it(
    material, cut, how
):
    for protocol in (DirectTLSProtocol, BufferingTLSTransport):
        server = Server(material, protocol=protocol)
        if cut:
            server.protocol.dataReceived(pending(client())[:cut])
        if how == "reset":
            server.protocol.connectionLost(Failure(ConnectionLost()))
        elif how == "aborted":  # the handshake deadline
            server.protocol.abortConnection()
            server.protocol.connectionLost(Failure(ConnectionAborted()))
        else:
            server.app.transport.loseConnection()
            server.protocol.connectionLost(Failure(ConnectionDone()))
        assert [type(r.value) for r in server.app.lost] == [ConnectionLost], protocol


def test_writes_before_the_client_hello_leave_after_the_handshake(material):
    server = Server(material, App(greeting=b"hello first\n"))
    assert server.transport.value() == b""
    peer = client()
    server.protocol.dataReceived(pending(peer))
    finish(server, peer)
    peer.bio_write(server.take())
    assert peer.recv(65536) == b"hello first\n"


def test_the_openssl_connection_is_freed_with_the_connection(material):
    heap = HeapTrimmer(None)
    server = Server(material, heap=heap)
    peer = client()
    server.protocol.dataReceived(pending(peer))
    finish(server, peer)
    handle = weakref.ref(server.protocol.getHandle())
    gc.disable()  # freed by its reference count, not by a collection some time later
    try:
        server.protocol.connectionLost(Failure(ConnectionDone()))
        assert handle() is None
    finally:
        gc.enable()
    assert heap.live == 0 and heap.peak == 1


# -- the heap --------------------------------------------------------------------


class Trims:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def test_the_heap_is_trimmed_once_after_a_burst_ends():
    trim, clock = Trims(), Clock()
    heap = HeapTrimmer(trim)
    for _ in range(heap.threshold + 100):
        heap.opened()
    for _ in range(heap.threshold + 100):
        heap.closed(clock)
    assert trim.calls == []
    clock.advance(heap.delay)
    assert trim.calls == [0] and heap.trims == 1 and heap.live == heap.peak == 0
    clock.advance(60)
    assert trim.calls == [0]


def test_the_heap_is_never_trimmed_under_a_steady_load():
    trim, clock = Trims(), Clock()
    heap = HeapTrimmer(trim)
    for _ in range(heap.threshold):
        heap.opened()
    for _ in range(100 * heap.threshold):  # one ends, one begins
        heap.closed(clock)
        heap.opened()
        clock.advance(0.01)
    assert trim.calls == [] and clock.getDelayedCalls() == []


def test_without_malloc_trim_nothing_is_scheduled():
    clock = Clock()
    heap = HeapTrimmer(None)
    for _ in range(2 * heap.threshold):
        heap.opened()
    for _ in range(2 * heap.threshold):
        heap.closed(clock)
    assert clock.getDelayedCalls() == []


def test_the_protocol_tells_the_heap_of_its_openssl_connections_and_the_factory_clock_trims(
    material,
):
    trim, clock = Trims(), Clock()
    heap = HeapTrimmer(trim)
    heap.threshold = 3
    servers = [Server(material, heap=heap, clock=clock) for _ in range(5)]
    servers[-1].protocol.connectionLost(
        Failure(ConnectionDone())
    )  # a silent one: no OpenSSL connection, nothing to tell
    for server in servers[:4]:
        peer = client()
        server.protocol.dataReceived(pending(peer))
        finish(server, peer)
    assert heap.live == heap.peak == 4
    for server in servers[:4]:
        server.protocol.connectionLost(Failure(ConnectionDone()))
    assert heap.live == 0 and trim.calls == []
    clock.advance(heap.delay)
    assert trim.calls == [0]


# -- a real server and Python's ssl module --------------------------------------------


def _queues(local: tuple[str, int], remote: tuple[str, int] | None) -> list[int]:
    """Receive queues of the IPv4 TCP sockets with these ends (remote None: listening)."""

    def hexAddress(address: tuple[str, int]) -> str:
        return f"{socket.inet_aton(address[0])[::-1].hex().upper()}:{address[1]:04X}"

    wanted = (hexAddress(local), hexAddress(remote) if remote else "00000000:0000")
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            queues.append(int(fields[4].split(":")[1], 16))
    return queues


def serverHasRead(sock: socket.socket) -> None:
    """
    Until the server has accepted C{sock}'s connection (its listening socket
    has no connection waiting) and read all that was sent on it (the
    server's end has nothing left to read), bounded.
    """
    server, client = sock.getpeername(), sock.getsockname()
    deadline = time.monotonic() + WAIT
    while _queues(server, None) != [0] or _queues(server, client) != [0]:
        assert time.monotonic() < deadline, "the server never read what was sent"
        time.sleep(0.01)


class TLSClient:
    """Python's ssl module over a connected socket, with the ClientHello sent as the test says."""

    def __init__(self, sock: socket.socket, material) -> None:
        context = ssl.create_default_context(cafile=str(material.ca))
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=False, server_hostname="127.0.0.1"
        )

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.incoming.write(chunk)

    def handshake(self, firstPart: int | None = None) -> None:
        """
        Send C{firstPart} bytes of the ClientHello (0: none), pause, then the
        rest, and finish.
        """
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = self.outgoing.read()
        if firstPart is not None:
            self.sock.sendall(hello[:firstPart])  # nothing, for 0
            # The rest only once the server holds the connection and has read the first part:
            # then the two cannot reach it as one read.
            serverHasRead(self.sock)
            hello = hello[firstPart:]
        self.sock.sendall(hello)
        for _ in range(20):
            self._receive()
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                continue
            self.sock.sendall(self.outgoing.read())
            return
        raise AssertionError("no handshake")

    def echo(self, data: bytes) -> bytes:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())
        received = b""
        while len(received) < len(data):
            try:
                received += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
        return received


def closedByServer(sock: socket.socket) -> bool:
    """Whether the server closes the connection (within WAIT) without sending anything."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def tlsServer(serve, material):
    def start(*options: str):
        server = serve(
            "--listen", f"echo@ssl:0:interface=127.0.0.1:privateKey={material.server}", *options
        )
        return server, server.service("echo").port

    return start


@pytest.mark.parametrize(
    "firstPart", [0, 1, 6, 100], ids=["silent", "1 byte", "6 bytes", "100 bytes"]
)
def test_a_handshake_after_a_silent_period_or_a_partial_client_hello_completes(
    tlsServer, material, firstPart
):
    server, port = tlsServer()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        peer = TLSClient(sock, material)
        peer.handshake(firstPart)
        assert peer.echo(b"still served\n") == b"still served\n"


def test_the_handshake_deadline_still_closes_silent_and_partial_clients(tlsServer, material):
    server, port = tlsServer("--tls-handshake-timeout", "0.5")
    context = ssl.create_default_context(cafile=str(material.ca))
    hello = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    partial = outgoing.read()[:100]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as stopped,
    ):
        stopped.sendall(partial)
        assert closedByServer(silent) and closedByServer(stopped)
    server.waitFor(
        r"tls handshake timeout after [\d.]+ s, 0 bytes in, 0 bytes out \(no handshake within "
        r"0.5 s\)",
        count=2,
    )
