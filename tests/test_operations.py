"""
Running as a managed service, with real processes: connection records in
JSON, limits, the idle timeout, draining on SIGTERM, metrics.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import threading
import urllib.error
import urllib.request

from conftest import WAIT, echoWhileSignalled, startServer, twistsock


def records(server) -> list[dict]:
    return [e for e in server.events if e.get("namespace", "").startswith("twistsock.connection")]


def test_json_record_fields_and_byte_counts():
    server = startServer("--listen", "echo@tcp:0:interface=127.0.0.1", json=True)
    try:
        target = server.service("echo").target
        assert twistsock("echo", target, "--size", "1000").returncode == 0
        server.waitFor(r"echo tcp .* peer closed")
    finally:
        server.stop()
    (record,) = records(server)
    assert {
        k: record[k]
        for k in ("service", "transport", "local", "reason", "detail", "bytes_in", "bytes_out")
    } == {
        "service": "echo",
        "transport": "tcp",
        "local": target.replace("tcp:", ""),
        "reason": "peer closed",
        "detail": None,
        "bytes_in": 1000,
        "bytes_out": 1000,
    }
    assert re.fullmatch(r"127\.0\.0\.1:\d+", record["peer"])
    assert 0 < record["duration"] < WAIT


def connect(server, name="echo", source="127.0.0.1", port: int | None = None) -> socket.socket:
    """A connection from `source`; one the server aborts at once may already be reset."""
    s = socket.socket()
    s.settimeout(WAIT)
    s.bind((source, 0))
    try:
        s.connect(("127.0.0.1", port or server.service(name).port))
    except ConnectionResetError:
        pass  # refused so fast that connect() saw the reset; isOpen() says False
    return s


def isOpen(s: socket.socket) -> bool:
    """Whether an echo connection still answers."""
    try:
        s.sendall(b"?")
        return s.recv(1) == b"?"
    except OSError:
        return False


def refusedOnce(server, source: str, why: str) -> None:
    """A connection from `source` is closed at once, with one record saying why."""
    s = connect(server, source=source)
    me = s.getsockname()[1]
    assert not isOpen(s)
    s.close()
    (line,) = server.waitFor(rf"{re.escape(source)}:{me} -> ")
    assert re.search(rf": limit after .* 0 bytes in, 0 bytes out \({why}\)$", line), line


def test_max_connections():
    server = startServer("--max-connections", "2", "--listen", "echo@tcp:0:interface=127.0.0.1")
    try:
        first, second = connect(server), connect(server)
        assert isOpen(first) and isOpen(second)
        refusedOnce(server, "127.0.0.1", "max connections")
        second.close()
        server.waitFor(r"echo tcp .* peer closed")
        third = connect(server)
        assert isOpen(third)
        first.close()
        third.close()
    finally:
        server.stop()


def test_max_per_peer_counts_each_client_address():
    server = startServer("--max-per-peer", "1", "--listen", "echo@tcp:0:interface=127.0.0.1")
    try:
        mine = connect(server)
        assert isOpen(mine)
        refusedOnce(server, "127.0.0.1", "max per peer")
        other = connect(server, source="127.0.0.2")  # another client address
        assert isOpen(other)
        mine.close()
        other.close()
    finally:
        server.stop()


def test_a_client_refused_by_its_proxy_header_never_reaches_the_service():
    """--max-per-peer behind proxy:, the refused client's data in the same packet as its header."""
    server = startServer("--max-per-peer", "1", "--listen", "echo@proxy:tcp:0:interface=127.0.0.1")
    header = b"PROXY TCP4 192.0.2.60 127.0.0.1 %d 80\r\n"
    try:
        held = connect(server)
        held.sendall(header % 1000 + b"held\n")
        assert held.recv(100) == b"held\n"  # served, and counted under 192.0.2.60
        refused = connect(server)
        try:
            refused.sendall(header % 1001 + b"second\n")
            assert refused.recv(100) == b""  # nothing echoed
        except ConnectionResetError:
            pass  # the abort, before or after the send
        (line,) = server.waitFor(r" 192\.0\.2\.60:1001 -> ")
        assert re.search(r": limit after .* 0 bytes in, 0 bytes out \(max per peer\)$", line), line
        assert isOpen(held)
        held.close()
        refused.close()
    finally:
        server.stop()
    assert not [line for line in server.lines if "Traceback" in line or "Unhandled" in line]


def closedWhileOtherTalks(silent: socket.socket, talker: socket.socket) -> int:
    """
    Echo a byte on `talker` every tenth of a second until the server closes
    `silent` (bounded); return how many echoes came back meanwhile.
    """
    exchanges = 0
    for _ in range(int(WAIT * 10)):
        if select.select([silent], [], [], 0.1)[0]:
            try:
                assert silent.recv(1) == b"", "the silent connection got data"
            except ConnectionResetError:
                pass  # an abort
            return exchanges
        assert isOpen(talker), f"the talking connection was closed after {exchanges} echoes"
        exchanges += 1
    raise AssertionError(f"the silent connection is still open after {WAIT} s")


def test_idle_timeout_closes_a_silent_connection_and_spares_others():
    server = startServer("--idle-timeout", "2", "--listen", "echo@tcp:0:interface=127.0.0.1")
    try:
        silent, talker = connect(server), connect(server)
        me, other = silent.getsockname()[1], talker.getsockname()[1]
        # The talker, opened with it, is served all along and outlives the silent one.
        assert closedWhileOtherTalks(silent, talker) > 0
        (line,) = server.waitFor(rf"127\.0\.0\.1:{me} -> ")
        assert line.endswith("(nothing received for 2 s)") and ": idle timeout after " in line
        assert isOpen(talker)
        assert not any(f"127.0.0.1:{other} -> " in line for line in server.lines)
        talker.close()
        (line,) = server.waitFor(rf"127\.0\.0\.1:{other} -> ")
        assert ": peer closed after " in line, line
        assert twistsock("echo", server.service("echo").target, "still served").returncode == 0
    finally:
        server.stop()


def test_sigterm_during_a_transfer_loses_no_bytes():
    server = startServer("--drain-timeout", "20", "--listen", "echo@tcp:0:interface=127.0.0.1")
    port = server.service("echo").port
    refusedWhileDraining = []

    def newcomer() -> None:
        # Draining: the port is closed to newcomers, while the transfer in flight finishes.
        server.waitFor(r"draining 1 connections")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        except ConnectionRefusedError:
            refusedWhileDraining.append(True)

    checker = threading.Thread(target=newcomer)
    checker.start()
    echoWhileSignalled(server, port, 16 << 20, waitFor=r"draining 1 connections")
    checker.join(WAIT)
    assert refusedWhileDraining == [True]
    assert server.stop() == -signal.SIGTERM
    assert not any("still open after" in line for line in server.lines)


def test_drain_deadline_closes_what_is_left_and_exits():
    server = startServer(
        "--drain-timeout", "1", "--idle-timeout", "0", "--listen", "echo@tcp:0:interface=127.0.0.1"
    )
    s = connect(server)
    assert isOpen(s)
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(WAIT) == -signal.SIGTERM
    finally:
        s.close()
    server.stop()
    assert any(
        re.search(r": server shutdown after .*\(still open after the 1 s drain\)$", line)
        for line in server.lines
    )


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, found by its name and label set (in any order)."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    return 0.0


def test_metrics_after_known_traffic(tmp_path):
    from twistsock import certs

    material = certs.generate(tmp_path)
    server = startServer(
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--max-per-peer",
        "1",
        "--listen",
        "echo@tcp:0:interface=127.0.0.1",
        "--listen",
        "upper@tcp:0:interface=127.0.0.1",
        "--listen",
        f"echo@ssl:0:privateKey={material.server}:interface=127.0.0.1",
        "--listen",
        "echo@udp:0:interface=127.0.0.1",
    )
    try:
        echo = next(
            e for e in server.listening if e.service == "echo" and e.endpoint.startswith("tcp:")
        )
        port = server.service("metrics").port
        tls = next(e for e in server.listening if e.endpoint.startswith("ssl:"))
        datagram = next(e for e in server.listening if e.endpoint.startswith("udp:"))
        for _ in range(3):
            assert twistsock("echo", echo.target, "ten bytes!").returncode == 0
        assert twistsock("upper", server.service("upper").target, "abc").returncode == 0
        for _ in range(5):
            assert twistsock("udp", "127.0.0.1", str(datagram.port), "dgram").returncode == 0
        with socket.create_connection(("127.0.0.1", tls.port), timeout=WAIT) as garbage:
            garbage.sendall(b"not TLS at all\r\n" * 4)
            try:
                garbage.recv(100)
            except ConnectionResetError:
                pass
        held = connect(server, port=echo.port)
        assert isOpen(held)
        refused = connect(server, port=echo.port)  # over --max-per-peer
        assert not isOpen(refused)
        refused.close()
        server.waitFor(r"limit after")
        server.waitFor(r"tls handshake failed")
        status, text = scrape(port)
        held.close()
    finally:
        server.stop()
    assert status == 200, text
    assert metric(text, "twistsock_connections_total", service="echo", transport="tcp") == 4
    assert metric(text, "twistsock_connections_total", service="upper", transport="tcp") == 1
    assert metric(text, "twistsock_connections_active", service="echo", transport="tcp") == 1
    assert (
        metric(text, "twistsock_connections_refused_total", service="echo", reason="max per peer")
        == 1
    )
    assert metric(text, "twistsock_bytes_received_total", service="echo") == 3 * 10 + 1
    assert metric(text, "twistsock_bytes_sent_total", service="echo") == 3 * 10 + 1
    assert metric(text, "twistsock_bytes_received_total", service="upper") == 4
    assert metric(text, "twistsock_datagrams_total", service="echo", outcome="answered") == 5
    assert metric(text, "twistsock_tls_handshake_failures_total", service="echo") == 1
    assert metric(text, "process_resident_memory_bytes") > 0


def test_healthz_says_ok_then_draining():
    server = startServer(
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--drain-timeout",
        "20",
        "--listen",
        "echo@tcp:0:interface=127.0.0.1",
    )
    try:
        port = server.service("metrics").port
        assert scrape(port, "/healthz") == (200, "ok\n")
        held = connect(server)
        assert isOpen(held)
        server.process.send_signal(signal.SIGTERM)
        server.waitFor(r"draining 1 connections")
        assert scrape(port, "/healthz") == (503, "draining\n")
        held.close()
        assert server.process.wait(WAIT) == -signal.SIGTERM
    finally:
        server.stop()


def test_metrics_endpoint_in_use_is_one_line_and_status_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        import subprocess

        from conftest import TWIST

        result = subprocess.run(
            [
                TWIST,
                "sockets",
                "--metrics",
                f"tcp:{busy}:interface=127.0.0.1",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert result.returncode == 1
    assert (
        result.stderr
        == f"twistsock: error: cannot listen on tcp:{busy}:interface=127.0.0.1 (metrics): "
        "Address already in use\n"
    )
