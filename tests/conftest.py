"""
Shared test harness: run `twist sockets` as a real process and the `twistsock`
command against it.  Nothing here imports the reactor (that would break
pytest --reactor=...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TWIST = str(BIN / "twist")
TWISTD = str(BIN / "twistd")
TWISTSOCK = str(BIN / "twistsock")

#: How long a test waits for a process to say something; generous, never a measurement.
WAIT = 30.0

# A suite started in the background by a script (`pytest &`, as CI runs its second suite) inherits
# SIGINT ignored, and every process it starts would inherit that too: the tests that interrupt a
# server, or the twistsock command, need SIGINT as a user's terminal has it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_LISTENING = re.compile(r"\] (\w+) listening on (\S+) \((.*)\)$")


@dataclass
class Listening:
    service: str
    address: str  # "127.0.0.1:5000", "[::1]:5000" or "unix:/path"
    endpoint: str

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def target(self) -> str:
        """A twistsock client endpoint string for this address."""
        if self.address.startswith("unix:"):
            return "unix:path=" + self.address[len("unix:") :]
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"tcp:{host.replace(':', chr(92) + ':')}:{self.port}"


@dataclass
class Server:
    """A running `twist sockets` (or `twistd -n sockets`) and what it logged."""

    process: subprocess.Popen
    json: bool = False
    lines: list[str] = field(default_factory=list)
    #: With json=True: every event as `twist --log-format=json` wrote it (one JSON object per line).
    events: list[dict] = field(default_factory=list)
    listening: list[Listening] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            if self.json and line.startswith("{"):
                # JSON Lines: one flat object per line (twistsock.logs).
                event = json.loads(line)
                self.events.append(event)
                line = f"[{event['namespace']}#{event['level']}] {event['text']}"
            with self._changed:
                self.lines.append(line)
                m = _LISTENING.search(line)
                if m:
                    self.listening.append(Listening(*m.groups()))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def waitFor(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """Wait until C{count} log lines match the regular expression C{pattern}."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {count} log lines match {pattern!r}; log:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(min(left, 0.5))

    def waitUntil(self, done, what: str, timeout: float = WAIT):
        """Wait until C{done(lines)} is true of the log so far, as it grows; return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = done(list(self.lines))
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"never {what}; log:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.5))

    def service(self, name: str) -> Listening:
        matches = [entry for entry in self.listening if entry.service == name]
        assert len(matches) == 1, f"{name}: {matches}"
        return matches[0]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(WAIT)
        return self.process.returncode

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def spawn(argv: list[str], *, cwd: Path | None = None, json: bool = False) -> Server:
    """Start a server process and collect its output; it is not waited for."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="backslashreplace",
        cwd=cwd,
    )
    server = Server(process, json=json)
    server._reader = threading.Thread(target=server._read, daemon=True)
    server._reader.start()
    _spawned.append(process)
    return server


#: Every server process a test started: any still running when the session ends is killed then
#: (a test that failed before its own clean-up must not leave one behind).
_spawned: list[subprocess.Popen] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    for process in _spawned:
        if process.poll() is None:
            process.kill()
            process.wait()


def startServer(
    *args: str,
    command: tuple[str, ...] = (TWIST, "--log-format=text"),
    cwd: Path | None = None,
    json: bool = False,
) -> Server:
    """Start `twist sockets ARGS` and wait until every --listen is listening."""
    if json:
        command = (TWIST, "--log-format=json")
    server = spawn([*command, "sockets", *args], cwd=cwd, json=json)
    expected = max(1, sum(1 for a in args if a == "--listen" or a.startswith("--listen=")))
    try:
        server.waitFor(r"listening on ", count=expected)
        server.waitFor(r"\] ready: \d+ listening")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def serve():
    """Start servers with C{serve(*args)}; every one is stopped after the test."""
    servers: list[Server] = []

    def start(*args: str, **kwargs) -> Server:
        server = startServer(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def runTwist(*args: str, command: tuple[str, ...] = (TWIST,)) -> subprocess.CompletedProcess:
    """Run `twist sockets ARGS` to completion (for start-up errors); output as text."""
    return subprocess.run(
        [*command, "sockets", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
    )


def twistsock(
    *args: str, input: bytes | None = None, timeout: float = WAIT
) -> subprocess.CompletedProcess:
    """Run the twistsock command; stdout and stderr as bytes."""
    return subprocess.run(
        [TWISTSOCK, *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture
def short_tmp(tmp_path_factory) -> Path:
    """A short directory for UNIX socket paths (they are limited to 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def echoWhileSignalled(
    server, port: int, size: int, signalAfter: int = 1 << 20, waitFor: str | None = None
) -> bytes:
    """
    Echo `size` random bytes through 127.0.0.1:port, sending SIGTERM to the
    server once `signalAfter` bytes have come back; then half-close and read
    the rest. Returns the data sent and checks it all came back.
    """
    import os as _os

    data = _os.urandom(size)
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    received = bytearray()
    signalled = threading.Event()

    def read() -> None:
        while chunk := s.recv(65536):
            received.extend(chunk)
            if len(received) > signalAfter and not signalled.is_set():
                signalled.set()
                server.process.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(0, len(data), 65536):
            s.sendall(data[i : i + 65536])
        assert signalled.wait(WAIT)
        if waitFor:
            server.waitFor(waitFor)
        s.shutdown(socket.SHUT_WR)
        reader.join(WAIT)
    finally:
        s.close()
    assert len(received) == len(data) and bytes(received) == data
    return data


def requireTool(name: str) -> str:
    """
    The path of a program the test needs: skipped where it is missing, a
    failure in CI (which installs it).
    """
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed")
    return path


def cutOffWhileSending(s, data: bytes, times: int, pause: float = 0.0) -> bool:
    """
    Send C{data} on C{s} up to C{times} times, C{pause} seconds apart;
    whether the server cut the connection off first (an error on sending).
    """
    for _ in range(times):
        try:
            s.sendall(data)
        except OSError:
            return True
        time.sleep(pause)
    return False


def openMany(port: int, count: int) -> list[socket.socket]:
    """
    C{count} connections to 127.0.0.1:C{port}, made without waiting on each
    (the server may refuse some, or never accept).
    """
    made = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        made.append(s)
    return made


def freePort() -> int:
    """
    A port free on 127.0.0.1 for TCP and UDP right now, below the kernel's
    ephemeral range: a port the kernel hands out (bind to port 0) can be
    taken by any outgoing connection's local end before the server that was
    meant to have it binds; ports below the range are never handed out.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    choose = random.SystemRandom()
    for _ in range(1000):
        port = choose.randrange(10000, max(10001, low))
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


@contextlib.contextmanager
def refusingPort(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1"):
    """
    A port on C{host} that refuses every connection (TCP) or datagram (UDP,
    by ICMP) for as long as the block runs, and that no other process can
    take meanwhile: it is bound by a socket that never listens (TCP), or that
    is connected elsewhere so that no datagram from a client matches it (UDP).
    Unlike a port found free and let go, it cannot start answering.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as held:
        held.bind((host, 0))
        if kind == socket.SOCK_DGRAM:
            held.connect((host, 9))
        yield held.getsockname()[1]


@pytest.fixture
def refusedPort():
    """A TCP port on 127.0.0.1 refusing every connection for the whole test (L{refusingPort})."""
    with refusingPort() as port:
        yield port


def pytest_configure(config) -> None:
    # Child processes must not inherit a coverage or warning setup that changes their output.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
