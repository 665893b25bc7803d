"""
Signals to a running `twist sockets`: a second Ctrl-C, a second SIGTERM, and a
SIGHUP whose log file cannot be opened again.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from conftest import TWIST, WAIT, freePort, startServer


def heldConnection(server) -> socket.socket:
    """An echo connection the server has answered, left open (it keeps the drain waiting)."""
    s = socket.create_connection(("127.0.0.1", server.service("echo").port), timeout=WAIT)
    s.sendall(b"open")
    assert s.recv(4) == b"open"
    return s


def test_a_second_sigint_during_the_drain_ends_the_server_at_once():
    server = startServer("--drain-timeout", "60", "--listen", "tcp:0:interface=127.0.0.1")
    held = heldConnection(server)
    try:
        server.process.send_signal(signal.SIGINT)
        server.waitFor(r"draining 1 connections for up to 60 s")
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(WAIT) == -signal.SIGINT
        assert time.monotonic() - started < WAIT / 2, "it waited for the drain"
    finally:
        held.close()
        server.stop()


def test_a_second_sigterm_during_the_drain_is_ignored_and_the_drain_goes_on():
    server = startServer("--drain-timeout", "60", "--listen", "tcp:0:interface=127.0.0.1")
    held = heldConnection(server)
    try:
        server.process.send_signal(signal.SIGTERM)
        server.waitFor(r"draining 1 connections")
        server.process.send_signal(signal.SIGTERM)  # as systemd does to every process of a unit
        held.sendall(b"still served")
        assert held.recv(12) == b"still served"
        assert server.process.poll() is None
        held.shutdown(socket.SHUT_WR)
        assert held.recv(1) == b""
        assert server.process.wait(WAIT) == -signal.SIGTERM
    finally:
        held.close()
        server.stop()
    assert "Traceback" not in "\n".join(server.lines)


def test_sighup_with_a_log_file_that_cannot_be_reopened_warns_and_serves_on(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    port = freePort()
    process = subprocess.Popen(
        [
            TWIST,
            "--log-format=text",
            f"--log-file={logs / 'twist.log'}",
            "sockets",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    rotated = tmp_path / "twist.log.1"

    def waitForLine(path, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while not (path.exists() and text in path.read_text()):
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, f"no {text!r} in {path}"
            time.sleep(0.05)

    try:
        waitForLine(logs / "twist.log", "] ready: 1 listening")
        # Rotated away, and the directory is gone: nothing to reopen by that name.
        (logs / "twist.log").rename(rotated)
        logs.rmdir()
        process.send_signal(signal.SIGHUP)
        waitForLine(rotated, "SIGHUP: cannot reopen the log file: ")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"served")
            assert s.recv(6) == b"served"
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not logs.exists()
