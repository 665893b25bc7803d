"""--workers: the master holds the sockets, the workers accept; restarts and draining."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
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
    try:
        server.waitFor(r"worker \d+ \(pid \d+\) ready", count=2)
    except BaseException:
        server.stop()  # a test that fails here leaves no server behind
        raise
    return server


def servedBy(server, count: int) -> set[int]:
    """Which workers served the last `count` connection records."""
    lines = server.waitFor(r"echo tcp .*, worker \d+$", count=count)
    return {int(re.search(r"worker (\d+)$", line).group(1)) for line in lines}


@contextmanager
def stopped(*pids: int):
    """The processes stopped (SIGSTOP) for the block, then continued, whatever happens in it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def onlyWorker(server, index: int):
    """
    Every worker but `index` stopped for the block: which process accepts a
    connection is then not the kernel's choice, as only one worker can (the
    master holds the sockets without ever reading them).
    """
    return stopped(*(pid for i, pid in workerPids(server).items() if i != index))


def workerOfNext(server, service: str, transport: str, exchange) -> int:
    """Run `exchange` (one connection, made and closed) and return the worker its record names."""
    record = rf"\] {service} {transport} .*, worker (\d+)$"
    before = len([line for line in server.lines if re.search(record, line)])
    exchange()
    line = server.waitFor(record, count=before + 1)[-1]
    return int(re.search(record, line).group(1))


def ended(pid: int) -> None:
    """Until the process `pid` has ended (a pidfd becomes readable then), bounded."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], WAIT)[0], f"pid {pid} still runs after {WAIT} s"
    finally:
        os.close(fd)


def echoes(target: str, text: str):
    def exchange() -> None:
        result = twistsock("echo", target, text)
        assert result.returncode == 0, result.stderr

    return exchange


def test_both_workers_accept_and_the_master_does_not():
    server = start("--listen", "tcp:0:interface=127.0.0.1")
    try:
        target = server.service("echo").target
        for index in (1, 2):
            with onlyWorker(server, index):
                assert workerOfNext(server, "echo", "tcp", echoes(target, f"to {index}")) == index
        # With both running, whichever the kernel wakes serves.
        for i in range(10):
            assert twistsock("echo", target, f"n{i}").returncode == 0
        assert servedBy(server, 12) <= {1, 2}
        assert not any(re.search(r"echo tcp .* out$", line) for line in server.lines), (
            "the master accepted a connection"
        )
    finally:
        assert server.stop() == -signal.SIGTERM


def test_a_killed_worker_comes_back_and_the_other_serves_meanwhile():
    server = start("--listen", "tcp:0:interface=127.0.0.1")
    try:
        target = server.service("echo").target
        old = workerPids(server)
        # The master stopped: it cannot restart worker 1 (its 1 s backoff would otherwise race
        # the client below), so "meanwhile" lasts until the master is continued.
        with stopped(server.process.pid):
            os.kill(old[1], signal.SIGKILL)
            ended(old[1])
            assert workerOfNext(server, "echo", "tcp", echoes(target, "meanwhile")) == 2
        server.waitFor(rf"worker 1 \(pid {old[1]}\) ended: signal 9 \(SIGKILL\)")
        server.waitFor(r"restarting worker 1 in 1 s")
        server.waitFor(r"worker 1 \(pid \d+\) ready", count=2)
        new = workerPids(server)
        assert new[1] != old[1] and new[2] == old[2]
        for index in (1, 2):
            with onlyWorker(server, index):
                assert (
                    workerOfNext(server, "echo", "tcp", echoes(target, f"after {index}")) == index
                )
    finally:
        server.stop()


def test_tls_and_unix_endpoints_are_shared_too(short_tmp, tmp_path):
    material = certs.generate(tmp_path)
    path = short_tmp / "w.sock"
    server = start(
        "--listen",
        f"unix:{path}",
        "--listen",
        f"upper@ssl:0:privateKey={material.server}:interface=127.0.0.1",
    )
    try:
        tls = server.service("upper").port

        def upper() -> None:
            result = twistsock("upper", f"tls:localhost:{tls}", "--ca", str(material.ca), "x")
            assert result.stdout == b"FROM SERVER: X\n", result.stderr

        for index in (1, 2):
            with onlyWorker(server, index):
                assert (
                    workerOfNext(server, "echo", "unix", echoes(f"unix:path={path}", "u")) == index
                )
                assert workerOfNext(server, "upper", "tls", upper) == index
    finally:
        server.stop()
    assert not path.exists()


def test_metrics_add_up_over_workers_and_udp_stays_in_the_master():
    server = start(
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        "udp:0:interface=127.0.0.1",
    )
    try:
        metrics = server.service("metrics").port
        tcp = next(e for e in server.listening if e.endpoint.startswith("tcp:"))
        datagram = next(e for e in server.listening if e.endpoint.startswith("udp:"))
        for _ in range(10):
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
    echoWhileSignalled(
        server, server.service("echo").port, 8 << 20, waitFor=r"waiting for 2 workers to drain"
    )
    assert server.process.wait(WAIT) == -signal.SIGTERM
    server.stop()
    assert (
        len(
            [
                line
                for line in server.lines
                if re.search(r"worker \d \(pid \d+\) ended: signal 15", line)
            ]
        )
        == 2
    )
    assert "Traceback" not in "\n".join(server.lines)


def killedOrEnded(pid: int) -> bool:
    """Whether a process has ended, or has a SIGKILL pending (/proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields["State"].split()[0] in ("Z", "X"):
        return True
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (signal.SIGKILL - 1)))


def echoed(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)
def test_sigkill_of_the_master_frees_the_port_for_an_immediate_restart():
    port = freePort()
    args = ("--listen", f"tcp:{port}:interface=127.0.0.1")
    first = start(*args)
    old = workerPids(first)
    # An open connection kept a worker draining (and the port bound) for the whole --drain-timeout.
    held = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    ends = {pid: os.pidfd_open(pid) for pid in old.values()}  # readable once the process ends
    try:
        assert echoed(held, b"open") == b"open"
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(WAIT)
        # The kernel sent each worker SIGKILL as the master ended: by the time the master is
        # reaped, each has ended or has it pending (no drain, whatever the scheduling).
        assert [pid for pid in old.values() if not killedOrEnded(pid)] == []
        for pid, fd in ends.items():
            assert select.select([fd], [], [], WAIT)[0], f"worker pid {pid} still runs"
        # first.stop() would wait for the end of the output the workers share: not yet.
        second = startServer(*args)  # it exits with status 1 if the port is still bound
        try:
            result = twistsock("echo", f"tcp:127.0.0.1:{port}", "again")
            assert result.returncode == 0 and result.stdout == b"Received: again\n", result.stderr
        finally:
            second.stop()
    finally:
        held.close()
        first.stop()
        for fd in ends.values():
            os.close(fd)


def test_during_the_drain_every_process_refuses_new_clients_and_open_ones_finish(short_tmp):
    path = short_tmp / "d.sock"
    server = start(
        "--drain-timeout", "20", "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"unix:{path}"
    )
    port = next(e for e in server.listening if e.endpoint.startswith("tcp:")).port
    open_ = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        assert echoed(open_, b"before") == b"before"
        server.process.send_signal(signal.SIGTERM)
        # The busy worker has closed its sockets once it drains; the idle one has ended.
        server.waitFor(r"draining 1 connections")
        server.waitFor(r"worker \d \(pid \d+\) ended: signal 15")
        refused = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            refused.connect(("127.0.0.1", port))
        refused.close()
        unixClient = socket.socket(socket.AF_UNIX)
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            unixClient.connect(str(path))
        unixClient.close()
        assert echoed(open_, b"during the drain") == b"during the drain"
        open_.shutdown(socket.SHUT_WR)
        assert open_.recv(1) == b""
    finally:
        open_.close()
    assert server.process.wait(WAIT) == -signal.SIGTERM
    server.stop()
    assert not path.exists()


def test_a_unix_socket_keeps_its_mode_when_workers_adopt_it(short_tmp):
    path = short_tmp / "m.sock"
    server = start("--listen", f"unix:{path}:mode=600")
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert twistsock("echo", f"unix:path={path}", "x").returncode == 0
    finally:
        server.stop()
