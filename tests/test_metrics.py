"""
The metrics endpoint's bounds, with real processes and real peers (curl,
http.client, sockets): request bodies are refused unread, headers are
bounded, connections are limited in number and closed at a deadline.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import pytest_twisted
from conftest import WAIT, requireTool, startServer

BODY = 50 << 20  # bytes a client offers to send


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample."""
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"no {name} in:\n{text}"
    return float(found.group(1))


def get(port: int, path: str = "/metrics") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def reply(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded: it must close)."""
    received = b""
    for _ in range(1000):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"still open after {received[:200]!r}")
    return received


def offer(port: int, head: bytes, size: int = BODY) -> tuple[int, bytes]:
    """
    Send C{head}, then up to C{size} bytes of body until the server stops
    taking them; how many it took, and its reply.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(head)
        sent = 0
        try:
            for _ in range(size // 65536):
                s.sendall(b"x" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        return sent, reply(s)


def statusOf(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def tempFilesOf(pid: int, tmp: Path) -> list[str]:
    """
    The files under C{tmp} that process C{pid} has open (an unlinked temporary
    file shows as C{tmp/#123 (deleted)}).
    """
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(tmp)):
            found.append(target)
    return found


@pytest.fixture(scope="module")
def metricsServer():
    """
    One `twist sockets --metrics` with TMPDIR set to a fresh, empty directory:
    (server, port, tmpdir).
    """
    tmp = Path(tempfile.mkdtemp(prefix="ts-metrics-tmp-"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp))
        server = startServer(
            "--metrics", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1"
        )
    try:
        yield server, server.service("metrics").port, tmp
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_50_MiB_post_is_refused_without_reading_its_body(metricsServer):
    server, port, tmp = metricsServer
    before = server.rss()
    opened: list[str] = []
    uploading = threading.Event()

    def watch() -> None:
        for _ in range(100_000):
            if not uploading.is_set():
                return
            opened.extend(tempFilesOf(server.process.pid, tmp))

    uploading.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        sent, response = offer(
            port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BODY
        )
    finally:
        uploading.clear()
        watcher.join(WAIT)
    assert statusOf(response) == 405, response
    assert b"\r\nAllow: GET, HEAD\r\n" in response and b"\r\nConnection: close\r\n" in response
    assert sent < BODY // 2  # the server stopped reading: only socket buffers took the rest
    assert opened == [] and list(tmp.iterdir()) == []
    assert server.rss() - before < BODY // 2
    status, text = get(port)
    assert status == 200 and metric(text, "twistsock_metrics_connections_refused_total") == 0


def test_get_with_a_body_is_413_and_closed(metricsServer):
    server, port, tmp = metricsServer
    sent, response = offer(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BODY
    )
    assert statusOf(response) == 413 and sent < BODY // 2, response
    sent, response = offer(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"10000\r\n",
    )
    assert statusOf(response) == 413 and sent < BODY // 2, response
    # A body so small it is all sent is refused the same (the bound is 0 bytes).
    sent, response = offer(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", size=0
    )
    assert statusOf(response) == 413
    _, response = offer(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        size=0,
    )
    assert statusOf(response) == 200 and b"twistsock_metrics_connections_refused_total" in response
    # http.client sends a generator chunked.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        try:
            connection.request("GET", "/metrics", body=(b"x" * 65536 for _ in range(BODY // 65536)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed while the body was going out; its answer is already here
        assert connection.getresponse().status == 413
    finally:
        connection.close()
    assert list(tmp.iterdir()) == []


def test_curl_posts_50_MiB_and_gets_405_then_gets_the_exposition(metricsServer):
    curl = requireTool("curl")
    server, port, tmp = metricsServer
    url = f"http://127.0.0.1:{port}/metrics"
    for extra in (
        [],
        ["-H", "Expect:"],
    ):  # with and without 100-continue; from a pipe curl sends chunked
        process = subprocess.Popen(
            [
                curl,
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--data-binary",
                "@-",
                *extra,
                url,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def feed(stdin: IO[bytes]) -> None:
            try:
                for _ in range(BODY // 65536):
                    stdin.write(b"x" * 65536)
                stdin.close()
            except BrokenPipeError:
                pass  # curl had its answer and stopped reading

        # This process's stdin, bound now: a feeder still running after its join
        # timed out must not write to the next round's curl.
        feeder = threading.Thread(target=feed, args=(process.stdin,))
        feeder.start()
        try:
            process.wait(WAIT)  # its output is a few bytes: the pipes cannot fill
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            feeder.join(WAIT)
        out, err = process.stdout.read(), process.stderr.read()
        for pipe in (process.stdin, process.stdout, process.stderr):
            try:
                pipe.close()
            except BrokenPipeError:
                pass
        assert (process.returncode, out, err) == (0, b"405", b"")
    result = subprocess.run(
        [
            curl,
            "-sS",
            "-X",
            "GET",
            "--data-binary",
            "body",
            url,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ],
        capture_output=True,
        timeout=WAIT,
    )
    assert result.stdout == b"413"
    result = subprocess.run([curl, "-sS", "--fail", url], capture_output=True, timeout=WAIT)
    assert (
        result.returncode == 0
        and b"twistsock_metrics_connections_refused_total 0.0" in result.stdout
    )
    assert list(tmp.iterdir()) == []


def test_headers_are_bounded(metricsServer):
    server, port, tmp = metricsServer
    _, response = offer(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 9000 + b"\r\n\r\n", size=0
    )
    assert statusOf(response) == 431
    _, response = offer(
        port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 100_000, size=0
    )  # no end of line at all
    assert statusOf(response) == 431
    _, response = offer(port, b"GET /" + b"m" * 9000 + b" HTTP/1.1\r\n\r\n", size=0)
    assert statusOf(response) == 414
    many = b"".join(b"X-%d: y\r\n" % i for i in range(65))
    _, response = offer(port, b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n", size=0)
    assert statusOf(response) == 400
    big = b"".join(
        b"X-%d: %s\r\n" % (i, b"y" * 4000) for i in range(5)
    )  # 20 KB in all: over 16 KiB
    _, response = offer(port, b"GET /metrics HTTP/1.1\r\n" + big + b"\r\n", size=0)
    assert statusOf(response) == 400
    assert get(port)[0] == 200


def isOpen(s: socket.socket) -> bool:
    """
    Whether the server has neither closed nor reset C{s} (nothing is expected
    to arrive on it).
    """
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        s.settimeout(WAIT)


def ask(s: socket.socket, path: str) -> tuple[int, str]:
    """A GET on an open connection, which stays open."""
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    response = http.client.HTTPResponse(s, method="GET")
    try:
        response.begin()
        return response.status, response.read().decode()
    finally:
        response.close()


def test_the_65th_metrics_connection_is_closed_at_once_and_counted():
    server = startServer(
        "--metrics", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1"
    )
    held: list[socket.socket] = []
    try:
        port = server.service("metrics").port
        for _ in range(64):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        assert ask(held[-1], "/healthz") == (200, "ok\n")  # the 64th is served
        extra = socket.socket()
        extra.settimeout(WAIT)
        try:
            extra.connect(("127.0.0.1", port))
            assert reply(extra) == b""  # closed (reset) as it was accepted
        except ConnectionResetError:
            pass  # reset before connect() returned
        finally:
            extra.close()
        assert all(isOpen(s) for s in held)
        status, text = ask(held[0], "/metrics")
        assert status == 200 and metric(text, "twistsock_metrics_connections_refused_total") == 1
        # Silent, or idle after a response: each is closed by the default
        # deadline, which frees its slot.
        for s in held:
            assert reply(s) == b""
        status, text = get(port)
    finally:
        for s in held:
            s.close()
        server.stop()
    assert status == 200 and metric(text, "twistsock_metrics_connections_refused_total") == 1
    assert not any("Timing out client" in line for line in server.lines)


def test_a_scraper_keeps_its_connection_between_requests(metricsServer):
    server, port, tmp = metricsServer
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        for _ in range(3):
            status, text = ask(s, "/metrics")
            assert status == 200 and "twistsock_metrics_connections_refused_total" in text
        assert ask(s, "/healthz") == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_a_silent_or_trickling_client_is_closed_at_the_deadline():
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    from twistsock.metrics import metricsSite

    site = metricsSite(dict, lambda: True, timeout=0.5)
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    port = listening.getHost().port

    def clients() -> tuple[bytes, bool, int, str]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as silent,
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as trickler,
        ):
            # A byte every 50 ms: each one comes well within the deadline, the request never does.
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 400
            closedByServer = False
            for byte in request:  # at most 20 s
                if not isOpen(trickler):
                    closedByServer = True
                    break
                trickler.sendall(bytes([byte]))
                time.sleep(0.05)
            # A whole request still gets its answer on a fresh connection,
            # which the deadline closes once idle.
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as fresh:
                status, _ = ask(fresh, "/metrics")
                return reply(silent), closedByServer, reply(trickler), status, reply(fresh)

    try:
        silentReply, trickleClosed, trickleReply, status, idleReply = await deferToThread(clients)
    finally:
        await listening.stopListening()
    assert silentReply == trickleReply == idleReply == b""
    assert trickleClosed
    assert status == 200
    # The server closed every one (the thread's result reaches the reactor
    # after their connectionLost).
    assert site.openConnections == 0 and site.refusedConnections == 0


def test_head_gets_the_headers_and_logs_nothing(metricsServer):
    import http.client

    server, port, _ = metricsServer
    for path in ("/healthz", "/metrics"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            connection.request("HEAD", path)
            response = connection.getresponse()
            assert response.status == 200 and response.read() == b""
            assert int(response.getheader("Content-Length")) > 0
        finally:
            connection.close()
    assert not [line for line in server.lines if "HEAD request" in line]
