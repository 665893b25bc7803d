"""
The fast paths: a write that sends at once when nothing is buffered
(twistsock._direct) and the reactor without a logging context per event
(twistsock.reactor).  Real sockets, driven by hand: no reactor runs.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import globalLogPublisher

from twistsock._direct import canWriteDirectly, loseDirectly, writeDirectly
from twistsock.reactor import TwistsockReactor


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.append(reason)


class Writes(MemoryReactor):
    """Counts the transports that asked to be told when they can write."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[object] = []

    def addWriter(self, writer: object) -> None:
        if writer not in self.writers:
            self.writers.append(writer)

    def removeWriter(self, writer: object) -> None:
        if writer in self.writers:
            self.writers.remove(writer)


def directWrite(transport):
    """The fast write for a transport that qualifies, as a Layer uses it."""
    assert canWriteDirectly(transport)
    return lambda data: writeDirectly(transport, data)


@pytest.fixture
def pair():
    """A Twisted TCP transport over one end of a socket pair, and the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = Writes()
    transport = tcp.Connection(ours, Recorder(), reactor)
    transport.connected = True
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def drain(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_nothing_buffered_is_sent_at_once_without_asking_the_reactor(pair):
    transport, peer, reactor = pair
    write = directWrite(transport)
    write(b"hello")
    assert peer.recv(100) == b"hello"
    assert reactor.writers == []
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""


def test_plain_write_would_have_waited_for_the_reactor(pair):
    # The control: Twisted's own write buffers and registers for writability.
    transport, peer, reactor = pair
    transport.write(b"hello")
    assert reactor.writers == [transport]
    assert drain(peer) == b""


def test_what_the_kernel_refuses_is_buffered_and_order_is_kept(pair):
    transport, peer, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    write = directWrite(transport)
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
    write(big)
    assert transport._tempDataLen > 0, "nothing left for Twisted to buffer: the test proves nothing"
    assert reactor.writers == [transport]
    write(b"after")  # must queue behind the rest, not jump ahead of it
    received = drain(peer)
    while transport._tempDataLen or transport.offset != len(transport.dataBuffer):
        assert transport.doWrite() is None
        received += drain(peer)
    assert received == big + b"after"


def test_a_write_never_overtakes_what_twisted_has_buffered(pair):
    transport, peer, reactor = pair
    transport.write(b"first ")  # Twisted's own write: buffered until the reactor says writable
    directWrite(transport)(b"second")
    assert drain(peer) == b""
    assert transport.doWrite() is None
    assert drain(peer) == b"first second"


def test_full_buffer_still_pauses_a_streaming_producer(pair):
    transport, peer, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    class Producer:
        paused = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    producer = Producer()
    transport.registerProducer(producer, True)
    write = directWrite(transport)
    write(b"x" * (transport.bufferSize * 4))
    assert producer.paused == 1


def test_after_lose_connection_writes_go_to_twisted(pair):
    transport, peer, reactor = pair
    write = directWrite(transport)
    transport.loseConnection()
    write(b"late")
    assert drain(peer) == b""  # buffered, and sent (or not) as Twisted decides


def test_an_error_is_left_for_twisted_to_find(pair):
    transport, peer, reactor = pair
    write = directWrite(transport)
    peer.close()
    write(b"into the void")
    write(b"and more")
    assert reactor.writers == [transport]
    result = transport.doWrite()
    assert isinstance(result, Exception)  # Twisted closes the connection, as it would have


def test_non_bytes_are_refused_as_twisted_refuses_them(pair):
    transport, peer, reactor = pair
    with pytest.raises(TypeError):
        directWrite(transport)("text")


@pytest.mark.parametrize("transport", [StringTransport(), None])
def test_other_transports_keep_their_own_write(transport):
    if transport is None:  # a socket transport that has started TLS the old way
        ours, theirs = socket.socketpair()
        transport = tcp.Connection(ours, Recorder(), MemoryReactor())
        transport.write = lambda data: None  # not Twisted's buffering write any more
        assert not canWriteDirectly(transport)
        ours.close()
        theirs.close()
    else:
        assert not canWriteDirectly(transport)


def test_started_tls_falls_back(pair):
    transport, peer, reactor = pair
    calls = []
    transport.TLS = True
    transport.protocol.write = calls.append
    directWrite(transport)(b"secret")
    assert calls == [b"secret"]
    assert drain(peer) == b""


# -- the reactor --


class Reader(tcp.Connection):
    """A socket the reactor reads; its protocol may raise."""

    def logPrefix(self) -> str:
        return "ReaderPrefix"


class Explodes(Recorder):
    def dataReceived(self, data: bytes) -> None:
        raise ValueError("boom")


@pytest.fixture
def reactor():
    reactor = TwistsockReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)
    reactor._poller.close()


def readerFor(reactor, protocol):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = Reader(ours, protocol, reactor)
    reader.connected = True
    protocol.makeConnection(reader)
    reactor.addReader(reader)
    return reader, theirs


def test_the_reactor_delivers_data_and_a_clean_close(reactor):
    protocol = Recorder()
    reader, peer = readerFor(reactor, protocol)
    peer.sendall(b"hello")
    reactor.doPoll(0)
    assert b"".join(protocol.received) == b"hello"
    peer.close()
    reactor.doPoll(0)
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionDone)


def test_the_reactor_logs_a_protocol_error_with_its_prefix_and_closes(reactor):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        protocol = Explodes()
        reader, peer = readerFor(reactor, protocol)
        peer.sendall(b"hello")
        reactor.doPoll(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
        peer.close()
    failures = [e for e in events if e.get("isError")]  # twisted.python.log's own event shape
    assert len(failures) == 1
    assert failures[0]["failure"].check(ValueError)
    assert failures[0]["system"] == "ReaderPrefix"
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ValueError)


# -- closing at once --


class Replier(Recorder):
    """Reply to the first data, then close (as upper and ack do), from inside dataReceived."""

    reply = b"REPLY\n"
    closedInside = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        writeDirectly(self.transport, self.reply)
        loseDirectly(self.transport)
        # Never inside the protocol's own stack: it is still connected here.
        self.closedInside = bool(self.lost)


def test_a_close_with_nothing_buffered_ends_the_same_pass_after_the_reply(reactor):
    protocol = Replier()
    reader, peer = readerFor(reactor, protocol)
    peer.sendall(b"line\n")
    reactor.doPoll(0)
    assert protocol.closedInside is False
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionDone)
    assert (
        reader.fileno() == -1
        and reader not in reactor.getWriters()
        and reader not in reactor.getReaders()
    )
    assert drain(peer) == b"REPLY\n"  # the reply, then end of stream: an orderly close
    peer.close()


def test_twisteds_reactor_closes_on_the_next_writable_pass_instead():
    """The same calls on a reactor without closeSoon: Twisted's loseConnection, unchanged."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = Writes()
    transport = tcp.Connection(ours, Recorder(), reactor)
    transport.connected = True
    loseDirectly(transport)
    assert transport.disconnecting and reactor.writers == [transport]
    ours.close()
    theirs.close()


def test_what_is_still_buffered_is_sent_before_the_close(reactor):
    protocol = Recorder()
    reader, peer = readerFor(reactor, protocol)
    big = b"x" * (8 << 20)  # more than the socket pair takes at once
    writeDirectly(reader, big)
    assert reader.dataBuffer or reader._tempDataLen
    loseDirectly(reader)
    assert reader in reactor.getWriters()  # Twisted's path: wait until it is sent
    received = []
    for _ in range(10_000):  # bounded: each pass sends what the peer made room for
        received.append(drain(peer))
        reactor.doPoll(0)
        if protocol.lost:
            break
    received.append(drain(peer))
    assert b"".join(received) == big
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionDone)
    peer.close()


def test_a_write_after_the_close_was_asked_for_is_still_sent(reactor):
    protocol = Recorder()
    reader, peer = readerFor(reactor, protocol)
    loseDirectly(reader)
    reader.write(b"late")  # Twisted buffers writes while disconnecting
    reactor.doPoll(0)  # the pending close finds data buffered: Twisted sends it, then closes
    for _ in range(10):
        if protocol.lost:
            break
        reactor.doPoll(0)
    assert drain(peer) == b"late"
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionDone)
    peer.close()


def test_an_abort_after_the_close_was_asked_for_stays_an_abort(reactor):
    from twisted.internet.error import ConnectionAborted

    protocol = Recorder()
    reader, peer = readerFor(reactor, protocol)
    loseDirectly(reader)
    reader.abortConnection()
    reactor.doPoll(0)
    assert not protocol.lost  # the pending close left it to the abort
    reactor.runUntilCurrent()  # the abort's callLater(0)
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionAborted)
    peer.close()


def test_a_failing_close_is_logged_and_the_others_still_close(reactor):
    class Breaks(Recorder):
        def connectionLost(self, reason: object = None) -> None:
            super().connectionLost(reason)
            raise RuntimeError("boom in connectionLost")

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        first, second = Breaks(), Recorder()
        r1, p1 = readerFor(reactor, first)
        r2, p2 = readerFor(reactor, second)
        loseDirectly(r1)
        loseDirectly(r2)
        reactor.doPoll(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(first.lost) == 1 and len(second.lost) == 1
    assert [e["failure"].value.args for e in events if e.get("isError")] == [
        ("boom in connectionLost",)
    ]
    p1.close()
    p2.close()


# -- a service that is its transport's producer (every stream service) --


class SelfProducing(Recorder):
    """Makes its transport its own producer, as StreamService does."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)


def test_a_layer_gives_its_transport_the_producer_only_when_output_is_held(pair):
    from twistsock._layer import Layer

    transport, peer, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    layer = Layer(SelfProducing())
    layer.makeConnection(transport)
    layer.write(b"short")  # sent whole: nothing to pause for
    assert transport.producer is None and drain(peer) == b"short"
    layer.write(b"x" * (transport.bufferSize * 4))  # the kernel takes part: the rest is held
    assert transport.producer is layer and transport.producerPaused
    layer.unregisterProducer()
    assert transport.producer is None


def test_a_layer_that_never_held_output_unregisters_without_asking_its_transport(pair):
    from twistsock._layer import Layer

    transport, peer, reactor = pair
    layer = Layer(SelfProducing())
    layer.makeConnection(transport)
    layer.write(b"answer")
    layer.unregisterProducer()
    layer.loseConnection()  # Twisted's: no producer to wait for
    assert transport.producer is None and transport.disconnecting


class LooksBack(Replier):
    """Replies and closes, noting whether the other protocols had been closed before it read."""

    others: list[Recorder] = []

    def dataReceived(self, data: bytes) -> None:
        self.othersClosed = [bool(p.lost) for p in self.others if p is not self]
        super().dataReceived(data)


def test_a_close_is_made_right_after_its_event_not_at_the_end_of_the_pass(reactor):
    first, second = LooksBack(), LooksBack()
    LooksBack.others = [first, second]
    readers = [readerFor(reactor, p) for p in (first, second)]
    for _, peer in readers:
        peer.sendall(b"line\n")
    reactor.doPoll(0)  # both readable in this one pass
    assert first.lost and second.lost
    # Whichever was read second found the other closed already.
    assert sorted([first.othersClosed, second.othersClosed]) == [[False], [True]]
    for _, peer in readers:
        assert drain(peer) == b"REPLY\n"
        peer.close()
