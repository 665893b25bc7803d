"""
A --workers worker process on its own, the test playing its master: it serves
the socket it is handed and reports its tallies; it never outlives its master.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess

from conftest import TWIST, WAIT

from twistsock import workers


def workerEnvironment(master: int, sock: socket.socket, report: int) -> dict[str, str]:
    return {
        **os.environ,
        workers.MASTER_PID: str(master),
        workers.WORKER: f"1:{sock.fileno()}/{int(sock.family)}:{report}",
    }


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(10)
    sock.setblocking(False)  # as a master's (Twisted's) listening sockets are
    return sock


def test_a_worker_serves_the_socket_it_is_handed_and_reports_to_its_master():
    sock = listening()
    r, w = os.pipe()
    env = workerEnvironment(os.getpid(), sock, w)
    process = subprocess.Popen(
        [TWIST, "--log-format=text", "sockets", "--listen", "tcp:0:interface=127.0.0.1"],
        env=env,
        pass_fds=(sock.fileno(), w),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    os.close(w)
    try:
        with socket.create_connection(sock.getsockname(), timeout=WAIT) as client:
            client.sendall(b"hello worker")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b"hello worker"
        # Reports come every second: the next one counts the connection.
        report = b""
        while b'"echo\\ttcp": 1' not in report:
            ready, _, _ = select.select([r], [], [], WAIT)
            assert ready, "no report with the connection"
            chunk = os.read(r, 65536)
            assert chunk, "the report pipe closed"
            report += chunk
        last = [line for line in report.split(b"\n") if b'"echo\\ttcp": 1' in line][-1]
        assert json.loads(last)["connections"] == {"echo\ttcp": 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(r)
        sock.close()
    log = process.stdout.read().decode()
    process.stdout.close()
    assert "echo served by worker 1 on 127.0.0.1:" in log
    assert f"worker 1 (pid {process.pid}) ready: 1 sockets" in log


def test_a_worker_whose_master_has_already_ended_ends_at_once():
    """The master died before the worker asked the kernel to be told: PDEATHSIG would never come."""
    sock = listening()
    r, w = os.pipe()
    try:
        # pid 1 is not this worker's parent: its master has ended.
        result = subprocess.run(
            [TWIST, "--log-format=text", "sockets", "--listen", "tcp:0:interface=127.0.0.1"],
            env=workerEnvironment(1, sock, w),
            pass_fds=(sock.fileno(), w),
            capture_output=True,
            text=True,
            timeout=WAIT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(r)
        os.close(w)
        sock.close()
    assert result.returncode == -workers.MASTER_DEATH_SIGNAL
    assert "ready" not in result.stdout
