"""--workers: the master holds the sockets, the workers accept; restarts and draining."""

from __future__ import annotations

import os
import re
import signal
import threading

from conftest import WAIT, echoWhileSignalled, freePort, startServer, twistsock
from test_operations import metric, scrape
from twistsock import certs


def workerPids(server) -> dict[int, int]:
    """The latest pid of each worker, from its ready lines."""
    pids = {}
    for line in server.lines:
        found = re.search(r"worker (\d+) \(pid (\d+)\) ready", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def start(*args: str):
    server = startServer("--workers", "2", *args)
    server.waitFor(r"worker \d+ \(pid \d+\) ready", count=2)
    return server


def servedBy(server, count: int) -> set[int]:
    """Which workers served the last `count` connection records."""
    lines = server.waitFor(r"echo tcp .*, worker \d+$", count=count)
    return {int(re.search(r"worker (\d+)$", line).group(1)) for line in lines}


def test_both_workers_accept_and_the_master_does_not():
    server = start("--listen", "tcp:0:interface=127.0.0.1")
    try:
        target = server.service("echo").target
        for i in range(40):
            assert twistsock("echo", target, f"n{i}").returncode == 0
        assert servedBy(server, 40) == {1, 2}
        assert not any(re.search(r"echo tcp .* out$", line) for line in server.lines), "the master accepted a connection"
    finally:
        assert server.stop() == -signal.SIGTERM


def test_a_killed_worker_comes_back_and_the_other_serves_meanwhile():
    server = start("--listen", "tcp:0:interface=127.0.0.1")
    try:
        target = server.service("echo").target
        old = workerPids(server)
        os.kill(old[1], signal.SIGKILL)
        server.waitFor(rf"worker 1 \(pid {old[1]}\) ended: signal 9 \(SIGKILL\)")
        assert twistsock("echo", target, "served by worker 2 meanwhile").returncode == 0
        server.waitFor(r"restarting worker 1 in 1 s")
        server.waitFor(r"worker 1 \(pid \d+\) ready", count=2)
        new = workerPids(server)
        assert new[1] != old[1] and new[2] == old[2]
        for i in range(40):
            assert twistsock("echo", target, f"after {i}").returncode == 0
        assert servedBy(server, 41) == {1, 2}
    finally:
        server.stop()


def test_tls_and_unix_endpoints_are_shared_too(short_tmp, tmp_path):
    material = certs.generate(tmp_path)
    path = short_tmp / "w.sock"
    server = start("--listen", f"unix:{path}", "--listen", f"upper@ssl:0:privateKey={material.server}:interface=127.0.0.1")
    try:
        tls = server.service("upper").port
        for i in range(20):
            assert twistsock("echo", f"unix:path={path}", f"u{i}").returncode == 0
            assert twistsock("upper", f"tls:localhost:{tls}", "--ca", str(material.ca), "x").stdout == b"FROM SERVER: X\n"
        assert {int(n) for n in re.findall(r"echo unix .*, worker (\d+)", "\n".join(server.lines))} == {1, 2}
    finally:
        server.stop()
    assert not path.exists()


def test_metrics_add_up_over_workers_and_udp_stays_in_the_master():
    metrics = freePort()
    server = start("--metrics", f"tcp:{metrics}:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "udp:0:interface=127.0.0.1")
    try:
        tcp = next(e for e in server.listening if e.endpoint.startswith("tcp:"))
        datagram = next(e for e in server.listening if e.endpoint.startswith("udp:"))
        for i in range(10):
            assert twistsock("echo", tcp.target, "0123456789").returncode == 0
        assert twistsock("udp", "127.0.0.1", str(datagram.port), "dgram").returncode == 0
        servedBy(server, 10)
        # Workers report every second: wait for the sum, bounded.
        for _ in range(int(WAIT * 10)):
            _, text = scrape(metrics)
            if metric(text, "twistsock_connections_total", service="echo", transport="tcp") == 10:
                break
            threading.Event().wait(0.1)
        assert metric(text, "twistsock_connections_total", service="echo", transport="tcp") == 10
        assert metric(text, "twistsock_bytes_received_total", service="echo") == 100
        assert metric(text, "twistsock_datagrams_total", service="echo", outcome="answered") == 1
    finally:
        server.stop()


def test_sigterm_drains_every_worker_without_losing_bytes():
    server = start("--drain-timeout", "20", "--listen", "tcp:0:interface=127.0.0.1")
    echoWhileSignalled(server, server.service("echo").port, 8 << 20, waitFor=r"waiting for 2 workers to drain")
    assert server.process.wait(WAIT) == -signal.SIGTERM
    server.stop()
    assert len([line for line in server.lines if re.search(r"worker \d \(pid \d+\) ended: signal 15", line)]) == 2
    assert "Traceback" not in "\n".join(server.lines)
