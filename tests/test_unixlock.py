"""
UNIX sockets and their lock files: removed at a clean exit, reclaimed when
nothing answers, refused when something does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
from conftest import WAIT, runTwist, startServer, twistsock

from twistsock._unixlock import InUse, reclaimStale

MODES = pytest.mark.parametrize("mode", [(), ("--workers", "2")], ids=["single", "workers"])


def start(mode: tuple[str, ...], *args: str):
    server = startServer(*mode, *args)
    if mode:
        try:
            server.waitFor(r"worker \d+ \(pid \d+\) ready", count=2)
        except BaseException:
            server.stop()  # a test that fails here leaves no server behind
            raise
    return server


@pytest.fixture
def unrelated():
    """
    A live process that has nothing to do with any socket (as a PID reused
    after a container restart).
    """
    process = subprocess.Popen(["sleep", str(int(WAIT * 4))])
    yield process.pid
    process.kill()
    process.wait()


def leftover(path) -> None:
    """A socket file nobody listens on, as a killed server leaves it."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@MODES
def test_a_clean_shutdown_removes_the_socket_and_its_lock(short_tmp, mode):
    path = short_tmp / "e.sock"
    server = start(mode, "--listen", f"unix:{path}")
    assert os.readlink(f"{path}.lock") == str(server.process.pid)
    assert server.stop() == -signal.SIGTERM
    assert sorted(os.listdir(short_tmp)) == []


@MODES
def test_a_lock_naming_a_live_unrelated_pid_is_reclaimed(short_tmp, mode, unrelated):
    path = short_tmp / "s.sock"
    os.symlink(str(unrelated), f"{path}.lock")
    leftover(path)
    server = start(mode, "--listen", f"unix:{path}")
    try:
        assert os.readlink(f"{path}.lock") == str(server.process.pid)
        result = twistsock("echo", f"unix:path={path}", "reclaimed")
        assert result.returncode == 0 and result.stdout == b"Received: reclaimed\n", result.stderr
    finally:
        server.stop()
    assert sorted(os.listdir(short_tmp)) == []


@MODES
def test_a_second_server_on_a_live_socket_refuses_in_one_line(short_tmp, mode):
    path = short_tmp / "l.sock"
    first = start(mode, "--listen", f"unix:{path}")
    try:
        second = runTwist("--listen", f"unix:{path}")
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert str(path) in second.stderr and f"pid {first.process.pid}" in second.stderr, (
            second.stderr
        )
        # The first is untouched.
        assert os.readlink(f"{path}.lock") == str(first.process.pid)
        assert twistsock("echo", f"unix:path={path}", "still").returncode == 0
    finally:
        assert first.stop() == -signal.SIGTERM
    assert sorted(os.listdir(short_tmp)) == []


# -- reclaimStale itself --


def test_no_lock_is_left_to_twisted(short_tmp):
    path = short_tmp / "n.sock"
    leftover(path)
    reclaimStale(str(path))
    assert path.exists()


def test_a_lock_naming_a_dead_pid_is_left_to_twisted(short_tmp):
    process = subprocess.Popen(["true"])
    process.wait()
    path = short_tmp / "d.sock"
    os.symlink(str(process.pid), f"{path}.lock")
    leftover(path)
    reclaimStale(str(path))
    assert os.path.lexists(f"{path}.lock") and path.exists()


def test_a_live_pid_and_no_listener_is_stale_even_our_own(short_tmp):
    path = short_tmp / "o.sock"
    os.symlink(str(os.getpid()), f"{path}.lock")  # the container case: the same PID as before
    leftover(path)
    reclaimStale(str(path))
    assert not os.path.lexists(f"{path}.lock") and not path.exists()


def test_a_file_that_is_not_a_socket_is_never_removed(short_tmp, unrelated):
    path = short_tmp / "f.sock"
    os.symlink(str(unrelated), f"{path}.lock")
    path.write_text("not a socket")
    reclaimStale(str(path))
    assert path.read_text() == "not a socket"


def test_a_listener_makes_the_lock_live(short_tmp, unrelated):
    path = short_tmp / "a.sock"
    os.symlink(str(unrelated), f"{path}.lock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        with pytest.raises(InUse, match=f"{path} is in use: pid {unrelated} "):
            reclaimStale(str(path))
        # A full backlog still answers.
        clients, full = [], False
        try:
            for _ in range(8):
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                clients.append(client)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    full = True
                    break
            assert full
            with pytest.raises(InUse):
                reclaimStale(str(path))
        finally:
            for client in clients:
                client.close()
    assert os.readlink(f"{path}.lock") == str(unrelated)
