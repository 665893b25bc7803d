"""IPv4 and IPv6 on one dual-stack port, and each alone."""

from __future__ import annotations

import re

from conftest import startServer, twistsock


def test_one_tcp6_port_serves_ipv4_and_ipv6_and_logs_plain_ipv4():
    # tcp6:0 binds "::": dual-stack on Linux. Traffic below stays on loopback.
    server = startServer("--listen", "sink@tcp6:0")
    try:
        port = server.service("sink").port
        assert twistsock("send", "127.0.0.1", str(port), "over IPv4").returncode == 0
        assert twistsock("send", "::1", str(port), "over IPv6").returncode == 0
        (v4,) = server.waitFor(r"-->over IPv4$")
        (v6,) = server.waitFor(r"-->over IPv6$")
        records = server.waitFor(r"sink tcp6 .* -> .*: peer closed", count=2)
    finally:
        server.stop()
    assert re.search(r"\] 127\.0\.0\.1:\d+ -->over IPv4$", v4), v4
    assert re.search(r"\] \[::1\]:\d+ -->over IPv6$", v6), v6
    assert any(re.search(r"sink tcp6 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+:", r) for r in records), (
        records
    )
    assert "::ffff:" not in "\n".join(server.lines)


def test_ipv4_only_and_ipv6_only_endpoints():
    server = startServer(
        "--listen", "echo@tcp:0:interface=127.0.0.1", "--listen", "upper@tcp6:0:interface=\\:\\:1"
    )
    try:
        v4, v6 = server.service("echo").port, server.service("upper").port
        assert twistsock("echo", "127.0.0.1", str(v4), "x").returncode == 0
        assert twistsock("echo", "::1", str(v4), "x").returncode == 3  # refused: IPv4 only
        assert twistsock("upper", "::1", str(v6), "x").returncode == 0
        assert twistsock("upper", "127.0.0.1", str(v6), "x").returncode == 3  # refused: IPv6 only
    finally:
        server.stop()
