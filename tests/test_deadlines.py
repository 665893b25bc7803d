"""
Every stage of a connection has a deadline and counts against the limits,
checked on a real server with real sockets (loopback, bounded loops): the
PROXY header, a trickled line.  No timing thresholds: what is checked is who
was served and who was closed, and why.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time

import pytest
from conftest import WAIT, openMany, startServer


@pytest.fixture(autouse=True)
def enoughDescriptors():
    """Thousands of client sockets in this process: raise the soft open-file limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if want < 4500:
        pytest.skip(f"needs about 4500 open files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def closedByServer(sockets: list[socket.socket], deadline: float) -> int:
    """
    Wait until every socket is closed or reset by the server (or the deadline
    passes); return how many were.
    """
    selector = selectors.DefaultSelector()
    for s in sockets:
        selector.register(s, selectors.EVENT_READ)
    closed = 0
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            try:
                if key.fileobj.recv(4096):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            selector.unregister(key.fileobj)
            closed += 1
    selector.close()
    return closed


def served(port: int, request: bytes, halfClose: bool = False) -> bytes:
    """
    Send C{request} (then end the input, if C{halfClose}); return all the
    server sent before closing.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(request)
        if halfClose:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def refusalCounts(lines: list[str]) -> dict[str, int]:
    """What the summaries of refusals add up to, by reason."""
    counts: dict[str, int] = {}
    for summary in [line for line in lines if "more connections refused in" in line]:
        for part in summary.rsplit("(", 1)[1].rstrip(")").split(", "):
            n, reason = part.split(" by ", 1)
            counts[reason] = counts.get(reason, 0) + int(n)
    return counts


def test_silent_proxy_connections_are_held_to_the_limit_and_closed_by_the_header_deadline():
    server = startServer(
        "--listen", "echo@proxy:tcp:0:interface=127.0.0.1:backlog=4096",
        "--max-connections", "100", "--proxy-header-timeout", "5", "--idle-timeout", "30",
    )  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        port = server.service("echo").port
        sockets = openMany(port, 2000)
        # Every one of the 2,000 ends: 100 held until the header deadline, the
        # rest refused at accept.
        assert closedByServer(sockets, time.monotonic() + 4 * WAIT) == 2000

        # Each connection is one record, or counted in a summary (one per burst: the refusals at
        # accept, then the header timeouts); none was served without a header.
        def recordsAndCounts(lines):
            records = [line for line in lines if " echo proxy 127.0.0.1:" in line]
            counts = refusalCounts(lines)
            return (records, counts) if len(records) + sum(counts.values()) >= 2000 else None

        records, counts = server.waitUntil(recordsAndCounts, "2000 connections accounted for")
        assert len(records) + sum(counts.values()) == 2000
        assert set(counts) == {"max connections", "proxy header timeout"}
        timedOut = counts["proxy header timeout"] + sum(
            ": proxy header timeout after " in r for r in records
        )
        refused = counts["max connections"] + sum(": limit after " in r for r in records)
        # Held to the limit, all closed by the deadline. (The 2,000 are accepted in well under a
        # second, even on a loaded machine: the 5 s deadline of the first 100 comes after.)
        assert (timedOut, refused) == (100, 1900)
        assert all("(no PROXY header within 5 s)" in r for r in records if "timeout" in r)
        # Once they are gone, a client with a header is served.
        assert (
            served(port, b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\nhello\n", halfClose=True)
            == b"hello\n"
        )
    finally:
        for s in sockets:
            s.close()
        server.stop()
    assert any(" echo proxy 192.0.2.7:4000 -> 127.0.0.1:80: " in line for line in server.lines)


def connected(sockets: list[socket.socket]) -> None:
    """Until every socket of L{openMany} has finished connecting (bounded); each must have."""
    selector = selectors.DefaultSelector()
    for s in sockets:
        selector.register(s, selectors.EVENT_WRITE)
    waiting = len(sockets)
    deadline = time.monotonic() + WAIT
    try:
        while waiting:
            assert time.monotonic() < deadline, f"{waiting} connections never completed"
            for key, _ in selector.select(timeout=1):
                assert key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                selector.unregister(key.fileobj)
                waiting -= 1
    finally:
        selector.close()


def test_a_thousand_trickling_clients_are_closed_by_the_line_deadline_while_others_are_served():
    server = startServer(
        "--listen",
        "upper@tcp:0:interface=127.0.0.1:backlog=2048",
        "--line-timeout",
        "3",
        "--idle-timeout",
        "30",
    )
    sockets: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        port = server.service("upper").port
        sockets = openMany(port, 1000)
        connected(sockets)
        for s in sockets:
            selector.register(s, selectors.EVENT_READ)
        trickling = set(sockets)
        servedWhileAllTrickle = 0
        deadline = time.monotonic() + 4 * WAIT
        # A byte from every trickler each round (never a newline), until the server has closed
        # them all; a legitimate client is served each round meanwhile.
        while trickling:
            assert time.monotonic() < deadline, f"{len(trickling)} tricklers are still open"
            for s in trickling:
                try:
                    s.send(b"x")
                except OSError:
                    pass  # closed by the server: seen below
            assert served(port, b"legitimate\n") == b"LEGITIMATE\n"
            if len(trickling) == len(sockets):
                servedWhileAllTrickle += 1
            for key, _ in selector.select(timeout=0.5):
                try:
                    if key.fileobj.recv(4096):
                        raise AssertionError("a trickler got an answer")
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    pass
                selector.unregister(key.fileobj)
                trickling.discard(key.fileobj)
        assert servedWhileAllTrickle > 0, "no legitimate client was served while all 1000 trickled"
        server.waitFor(
            r"upper tcp 127\.0\.0\.1:\d+ -> .*: line timeout after \d+\.\d+ s, \d+ bytes in, "
            r"0 bytes out \(no complete line within 3 s\)$",
            count=1000,
        )
    finally:
        selector.close()
        for s in sockets:
            s.close()
        server.stop()
