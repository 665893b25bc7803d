"""
Hostile conditions, against `twist sockets` as a real process on loopback:
floods, running out of file descriptors, slow peers, resets and crashes, bad
configuration, spoofed PROXY headers and UDP floods.  Every loop is bounded;
every figure asserted is a count, never a duration.
"""

from __future__ import annotations

import os
import re
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import time

import pytest
from conftest import TWIST, WAIT, cutOffWhileSending, freePort, runTwist, startServer, twistsock

ECHO = "echo@tcp:0:interface=127.0.0.1:backlog=4096"
TEXT = (TWIST, "--log-format=text")


@pytest.fixture
def moreFiles():
    """Let this test process hold a few thousand sockets; put the limit back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 5000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(
            f"the hard open-file limit ({hard}) is below {wanted}: this test needs a machine "
            "that allows it"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def exchangeAll(
    sockets: list[socket.socket], payloads: list[bytes], deadline: float
) -> list[bytes]:
    """Send each socket its payload and read as many bytes back, all at once, with one selector."""
    selector = selectors.DefaultSelector()
    received = [bytearray() for _ in sockets]
    sent = [0] * len(sockets)
    for i, s in enumerate(sockets):
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    pending = len(sockets)
    try:
        while pending and time.monotonic() < deadline:
            for key, events in selector.select(timeout=1):
                i, s = key.data, key.fileobj
                if events & selectors.EVENT_WRITE and sent[i] < len(payloads[i]):
                    try:
                        sent[i] += s.send(payloads[i][sent[i] : sent[i] + 65536])
                    except BlockingIOError:
                        pass
                    if sent[i] == len(payloads[i]):
                        selector.modify(s, selectors.EVENT_READ, i)
                if events & selectors.EVENT_READ:
                    chunk = s.recv(65536)
                    if not chunk:
                        selector.unregister(s)
                        pending -= 1
                        continue
                    received[i] += chunk
                    if len(received[i]) >= len(payloads[i]):
                        selector.unregister(s)
                        pending -= 1
    finally:
        selector.close()
    return [bytes(r) for r in received]


def closedByServer(s: socket.socket) -> bool:
    """
    Whether the server closed the connection (cleanly, or with a reset: an
    abort with unread input).
    """
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


# -- floods --


def test_2000_concurrent_connections_echo_every_byte(moreFiles):
    server = startServer("--listen", ECHO)
    try:
        port = server.service("echo").port
        sockets = []
        for _ in range(2000):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        payloads = [os.urandom(16384) for _ in sockets]
        before = server.rss()
        received = exchangeAll(sockets, payloads, time.monotonic() + 120)
        print(
            f"\n2000 connections held: server RSS {before >> 20} MiB before the echo, "
            f"{server.rss() >> 20} MiB after"
        )
        wrong = sum(1 for got, want in zip(received, payloads, strict=True) if got != want)
        assert wrong == 0, f"{wrong} of 2000 connections did not get their 16 KiB back"
        for s in sockets:
            s.close()
        server.waitFor(r"echo tcp .* 16384 bytes in, 16384 bytes out", count=2000, timeout=60)
        assert "Traceback" not in "\n".join(server.lines)
    finally:
        server.stop()


def test_out_of_file_descriptors_refuses_logs_once_serves_the_rest_and_recovers():
    # The server may open 64 files: a few for itself, about fifty connections.
    limited = ("sh", "-c", 'ulimit -n 64 && exec "$0" "$@"', TWIST, "--log-format=text")
    server = startServer("--listen", ECHO, command=limited)
    try:
        port = server.service("echo").port
        (warning,) = server.waitFor(r"open-file limit \(64\) is below --max-connections")
        usable = int(re.search(r"beyond about (\d+) will", warning).group(1))
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(100)]
        served, refused = [], 0
        for s in clients:
            try:
                s.sendall(b"x")
                reply = s.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
            if reply == b"x":
                served.append(s)
            else:
                refused += 1
                s.close()
        assert served and refused, (len(served), refused)
        assert len(served) + refused == 100
        assert abs(len(served) - usable) <= 3, (len(served), usable)  # the warning said so
        # The connections it has are still served.
        for s in served:
            s.sendall(b"still here")
            assert s.recv(100) == b"still here"
        # Once per burst, not once per refused connection.
        warnings = server.waitFor(r"cannot take new connections on tcp:0")
        assert len(warnings) == 1 and "open-file limit 64" in warnings[0]
        for s in served:
            s.close()
        summary = server.waitFor(r"taking connections on tcp:0\S* \(echo\) again")
        print(
            f"\nopen-file limit 64: {len(served)} of 100 connections served, {refused} "
            f"refused; {summary[0].split('] ', 1)[1]}"
        )
        assert f"{refused} refused" in summary[0]
        # Recovered: a new connection is served.
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"back")
            assert s.recv(4) == b"back"
        assert len(server.waitFor(r"cannot take new connections")) == 1
        assert "Traceback" not in "\n".join(server.lines)
    finally:
        server.stop()


# -- slow peers --


def test_a_byte_at_a_time_is_not_idle_and_silence_then_is():
    server = startServer(
        "--listen", "upper@tcp:0:interface=127.0.0.1", "--keep-open", "--max-line", "512",
        "--idle-timeout", "2",
    )  # fmt: skip
    try:
        port = server.service("upper").port
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s,
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as witness,
        ):
            # A byte every tenth of a second, never a newline, until the idle timeout closes a
            # silent connection opened at the same time: the line has then taken longer than
            # the timeout, and was never idle (gaps of 0.1 s against 2 s).
            sent = 0
            while not select.select([witness], [], [], 0.1)[0]:
                assert sent < 500, "the silent connection was never closed"
                s.sendall(b"a")
                sent += 1
            assert closedByServer(witness)
            s.sendall(b"\n")
            assert readLine(s) == b"A" * sent + b"\n"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"a")  # then nothing
            assert closedByServer(s)  # by the idle timeout
        server.waitFor(r"upper tcp .*: idle timeout after", count=2)
    finally:
        server.stop()


def test_the_line_limit_holds_however_slowly_the_line_comes():
    server = startServer(
        "--listen", "upper@tcp:0:interface=127.0.0.1", "--keep-open", "--max-line", "6",
        "--idle-timeout", "30",
    )  # fmt: skip
    try:
        port = server.service("upper").port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"abc\n")
            assert s.recv(100) == b"ABC\n"
            for byte in b"abcdefgh":
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                # Apart, so that the server reads them one by one: nothing depends on how long.
                select.select([s], [], [], 0.1)
            assert s.recv(100) == b"error: line longer than 6 bytes\n"
            assert s.recv(100) == b""
    finally:
        server.stop()


@pytest.mark.parametrize("service", ["upper", "ack"])
def test_a_client_that_sends_more_than_one_line_gets_the_whole_reply_then_the_end(service):
    """
    upper and ack answer one line and close: closing with the client's
    further input unread made the kernel reset the connection and drop the
    part of the reply not yet received (4096 of 20001 bytes here).
    """
    server = startServer(
        "--listen", f"{service}@tcp:0:interface=127.0.0.1", "--max-line", "100000"
    )  # fmt: skip
    try:
        port = server.service(service).port
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the reply waits in the server
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", port))
        line = b"a" * 20000 + b"\n"
        s.sendall(line + b"x" * 100000)
        received = b""
        while chunk := s.recv(65536):  # a reset raises here
            received += chunk
        assert received == (line.upper() if service == "upper" else b"I got your message")
        s.close()
        (record,) = server.waitFor(rf"{service} tcp .*: service closed after .* bytes in")
        assert "120001 bytes in" in record
    finally:
        server.stop()


def test_a_client_that_never_stops_sending_after_its_line_is_cut_off():
    server = startServer("--listen", "upper@tcp:0:interface=127.0.0.1")
    try:
        port = server.service("upper").port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"one\nz")  # more than the line: the server drains, within a limit
            assert readLine(s) == b"ONE\n"
            # 12.5 MiB at most: the limit and both sockets' buffers.
            assert cutOffWhileSending(s, b"z" * 65536, 200)
        server.waitFor(r"upper tcp .*: service closed after")
    finally:
        server.stop()


def readLine(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, f"closed after {line!r}"
        line += chunk
    return line


# -- resets and crashes --


def test_a_reset_mid_transfer_is_one_record_and_the_server_carries_on():
    server = startServer("--listen", ECHO)
    try:
        port = server.service("echo").port
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(os.urandom(1 << 20))
        s.recv(1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST, with most of the echo unread
        # "error (...)" when the reset is read; Twisted's epoll reactor reports
        # a reset that comes with nothing left to read (EPOLLHUP) as a clean
        # close, so "peer closed" is possible too.
        records = server.waitFor(
            r"echo tcp 127\.0\.0\.1:\d+ -> .*: (error|peer closed) after .* bytes in"
        )
        assert len(records) == 1
        result = twistsock("echo", server.service("echo").target, "after the reset")
        assert result.returncode == 0 and result.stdout == b"Received: after the reset\n"
        assert "Traceback" not in "\n".join(server.lines)
    finally:
        server.stop()


CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
block = bytes(range(256)) * 256
s.sendall(block)
got = 0
while got < len(block):
    got += len(s.recv(65536))
print("echoing", flush=True)
while True:  # until SIGKILL
    s.sendall(block)
    s.recv(65536)
"""


def test_a_client_killed_mid_echo_leaves_the_server_serving():
    import sys

    server = startServer("--listen", ECHO)
    try:
        port = server.service("echo").port
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout.readline() == "echoing\n"
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait(WAIT)
            client.stdout.close()
        record = server.waitFor(r"echo tcp 127\.0\.0\.1:\d+ -> .*(error|peer closed) after")
        assert int(re.search(r"(\d+) bytes in", record[0]).group(1)) >= 65536
        result = twistsock("echo", server.service("echo").target, "still serving")
        assert result.returncode == 0 and result.stdout == b"Received: still serving\n"
        assert "Traceback" not in "\n".join(server.lines)
    finally:
        server.stop()


def test_a_server_killed_with_sigkill_restarts_at_once_on_the_same_unix_path_and_port(short_tmp):
    port = freePort()
    path = short_tmp / "echo.sock"
    args = ("--listen", f"echo@tcp:{port}:interface=127.0.0.1", "--listen", f"echo@unix:{path}")
    first = startServer(*args)
    # Connections open at the kill: their ports go to TIME_WAIT, the socket
    # file and its lock stay behind.
    held = [socket.create_connection(("127.0.0.1", port), timeout=WAIT)]
    unixClient = socket.socket(socket.AF_UNIX)
    unixClient.connect(str(path))
    held.append(unixClient)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(WAIT)
    first.stop()
    try:
        assert path.exists()  # stale: nobody cleaned up
        second = startServer(*args)
        try:
            for target in (f"tcp:127.0.0.1:{port}", f"unix:path={path}"):
                result = twistsock("echo", target, "again")
                assert result.returncode == 0 and result.stdout == b"Received: again\n", (
                    result.stderr
                )
        finally:
            second.stop()
    finally:
        for s in held:
            s.close()


# -- bad configuration --


@pytest.fixture(scope="module")
def keyOnly(tmp_path_factory):
    """A file with a private key and no certificate, and one with a certificate and no key."""
    from twistsock.certs import generate

    directory = tmp_path_factory.mktemp("material")
    pem = generate(directory).server.read_text()
    key = pem[: pem.index("-----END PRIVATE KEY-----") + len("-----END PRIVATE KEY-----\n")]
    cert = pem[len(key) :]
    (directory / "key.pem").write_text(key)
    (directory / "cert.pem").write_text(cert)
    return directory


@pytest.mark.parametrize(
    "listen, detail",
    [
        ("echo@", "no endpoint"),
        ("nosuch@tcp:0", "unknown service"),
        ("tcp:", "bad endpoint"),
        ("tcp:99999", "bad endpoint"),
        ("tcp:0:interface=::", "bad endpoint"),
        ("tcp:0:backlog=many", "bad endpoint"),
        ("udp:x", "bad endpoint"),
        ("proxy:udp:0", "PROXY header cannot come before datagrams"),
        ("ssl:0:privateKey={missing}", "No such file or directory"),
        ("ssl:0:privateKey={dir}/key.pem", "bad endpoint"),
        ("ssl:0:privateKey={dir}/cert.pem", "bad endpoint"),
        ("mtls:0:privateKey={dir}/server.pem", "bad endpoint"),
        ("mtls:0:privateKey={dir}/server.pem:clientCA={missing}", "bad endpoint"),
    ],
)
def test_bad_configuration_is_one_line_and_status_1_before_anything_listens(
    listen, detail, keyOnly
):
    port = freePort()
    listen = listen.format(dir=keyOnly, missing=keyOnly / "nosuch.pem")
    result = runTwist(
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", listen, command=TEXT
    )
    assert result.returncode == 1, result
    assert result.stderr.startswith("twistsock: error: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert detail in result.stderr
    assert "listening on" not in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_a_unix_path_in_a_missing_directory_is_one_line_and_status_1(short_tmp):
    result = runTwist("--listen", f"unix:{short_tmp}/no/such/dir/echo.sock", command=TEXT)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "No such file or directory" in result.stderr


# -- spoofing --


PROXY_V1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 5000\r\n"


def test_a_proxy_header_to_a_plain_port_is_data_and_changes_no_address():
    server = startServer("--listen", ECHO, "--max-per-peer", "1")
    try:
        port = server.service("echo").port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(PROXY_V1)
            assert s.recv(100) == PROXY_V1  # echoed like any bytes
            # Claiming another address does not get round the per-client limit.
            with socket.socket() as t:
                t.settimeout(WAIT)
                try:
                    t.connect(("127.0.0.1", port))
                    t.sendall(PROXY_V1.replace(b"203.0.113.9", b"203.0.113.10"))
                    refused = closedByServer(t)
                except (ConnectionResetError, BrokenPipeError):
                    refused = True  # reset before connect() returned, or before it could send
                assert refused
        server.waitFor(r"echo tcp 127\.0\.0\.1:\d+ -> .*bytes in")
        assert "203.0.113" not in "\n".join(line for line in server.lines if "echo tcp" in line)
    finally:
        server.stop()


def test_a_proxy_port_refuses_a_connection_without_a_header_and_trusts_one_with_it():
    server = startServer("--listen", "echo@proxy:tcp:0:interface=127.0.0.1")
    try:
        port = server.service("echo").port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"hello, no header here\r\n")
            assert closedByServer(s)
        server.waitFor(
            r"echo proxy 127\.0\.0\.1:\d+ -> .*: proxy header invalid after .*, 23 bytes in, "
            r"0 bytes out \(no PROXY signature, first bytes: hello, no header here\\r\\n\)$"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(PROXY_V1 + b"hello")
            assert s.recv(100) == b"hello"
        server.waitFor(r"echo proxy 203\.0\.113\.9:4444 -> 127\.0\.0\.1:5000")
    finally:
        server.stop()


# -- UDP floods --


def flood(port: int, sources: list[str], count: int) -> None:
    """
    Send `count` datagrams to 127.0.0.1:port, spread over the source addresses,
    without reading replies.
    """
    sockets = []
    for source in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source, 0))
        s.setblocking(False)
        sockets.append(s)
    try:
        sent = 0
        while sent < count:
            s = sockets[sent % len(sockets)]
            try:
                s.sendto(b"flood %d" % sent, ("127.0.0.1", port))
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
    finally:
        for s in sockets:
            s.close()


def askUntilAnswered(port: int, source: str, tries: int = 20) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(0.5)
        for i in range(tries):
            s.sendto(b"legit %d" % i, ("127.0.0.1", port))
            try:
                while True:
                    data = s.recv(100)
                    if data.startswith(b"legit"):
                        return True
            except TimeoutError:
                continue
    return False


@pytest.mark.parametrize("sources", [1, 500], ids=["one source", "500 sources"])
def test_udp_flood_the_limit_holds_memory_stays_flat_and_others_are_answered(sources):
    import threading

    server = startServer(
        "--listen",
        "echo@udp:0:interface=127.0.0.1",
        "--udp-rate",
        "10",
        "--udp-burst",
        "20",
        "--udp-summary-interval",
        "0",
    )
    try:
        port = server.service("echo").port
        addresses = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(sources)]
        started = time.monotonic()
        flood(port, addresses, 20_000)  # warm up: buckets made, buffers grown
        before = server.rss()
        flooding = threading.Thread(target=flood, args=(port, addresses, 100_000))
        flooding.start()
        try:
            answered = askUntilAnswered(port, "127.9.9.9")
        finally:
            flooding.join(WAIT * 4)
        elapsed = time.monotonic() - started
        after = server.rss()
        assert answered, "a legitimate client got no answer during the flood"
        print(
            f"\nUDP flood from {sources} source(s): server RSS {before >> 10} KiB before "
            f"100,000 datagrams, {after >> 10} KiB after"
        )
        assert after - before < 8 << 20, (
            f"memory grew by {(after - before) >> 10} KiB over 100,000 datagrams"
        )
    finally:
        server.stop()
    log = "\n".join(line for line in server.lines if "udp" in line and " from " in line)
    flooders = "\n".join(line for line in log.splitlines() if "127.9.9.9" not in line)
    answeredFlood = sum(int(n) for n in re.findall(r"(\d+) answered", flooders))
    limited = sum(int(n) for n in re.findall(r"(\d+) rate limited", flooders))
    # Each source gets its burst of 20, then 10 a second; everything else it sent is refused.
    print(
        f"flooders: {answeredFlood} answered, {limited} rate limited in {elapsed:.1f} s (the "
        "rest dropped by the kernel)"
    )
    assert 0 < answeredFlood <= sources * (20 + 10 * (elapsed + 1))
    assert limited > answeredFlood
