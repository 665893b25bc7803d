"""
`twist sockets` as a real process on loopback (TCP, TCP over ::1, UNIX),
driven by the real `twistsock` command and by raw sockets.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import TWIST, TWISTD, WAIT, freePort, runTwist, startServer, twistsock

SERVICES = ("echo", "upper", "sink", "ack")


def listenArgs(transport: str, tmp) -> list[str]:
    args = []
    for name in SERVICES:
        if transport == "tcp":
            endpoint = "tcp:0:interface=127.0.0.1"
        elif transport == "tcp6":
            endpoint = "tcp6:0:interface=\\:\\:1"
        else:
            endpoint = f"unix:{tmp}/{name}.sock"
        args += ["--listen", f"{name}@{endpoint}"]
    return args


@pytest.fixture(
    params=[
        ("tcp", "default"),
        ("tcp6", "default"),
        ("unix", "default"),
        ("tcp", "twistsock"),
        ("unix", "twistsock"),
    ],
    ids=lambda p: "-".join(p),
)
def server(request, short_tmp):
    """
    One `twist sockets` serving all four services on one kind of transport, on
    Twisted's reactor and on twistsock's.
    """
    transport, reactor = request.param
    server = startServer(
        *listenArgs(transport, short_tmp),
        command=(TWIST, f"--reactor={reactor}", "--log-format=text"),
    )
    server.transport = transport
    yield server
    assert server.stop() == -15 or server.process.returncode in (0, 143), server.lines
    assert "Traceback" not in "\n".join(server.lines)


def targets(server, name) -> list[list[str]]:
    """Every way to name this service on the command line: endpoint string, and HOST PORT."""
    listening = server.service(name)
    forms = [[listening.target]]
    if server.transport != "unix":
        forms.append([listening.host, str(listening.port)])
    return forms


def ok(result) -> bytes:
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout


def rawConnect(server, name) -> socket.socket:
    listening = server.service(name)
    if listening.address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(listening.address[len("unix:") :])
    else:
        s = socket.create_connection((listening.host, listening.port))
    s.settimeout(WAIT)
    return s


def readAll(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the classic programs, each scenario -----------------------------------


def test_streamwrite_to_streamread(server):
    for target in targets(server, "sink"):
        assert ok(twistsock("send", *target, "Half a league, half a league ... ")) == b""
    server.waitFor(r"-->Half a league, half a league \.\.\. $", count=len(targets(server, "sink")))
    server.waitFor(r"Ending connection$", count=len(targets(server, "sink")))


def test_streamwrite_send_reads_stdin(server):
    ok(twistsock("send", server.service("sink").target, input=b"from stdin\n"))
    server.waitFor(r"-->from stdin\\n$")


def test_connection_oriented_echo_of_250_bytes(server):
    for target in targets(server, "echo"):
        assert (
            ok(twistsock("echo", *target, "--size", "250"))
            == b"Received: 250 bytes, identical to those sent\n"
        )


def test_tcp_echo_client_message(server):
    for target in targets(server, "echo"):
        assert ok(twistsock("echo", *target, "Hello, echo!")) == b"Received: Hello, echo!\n"


def test_echo_5_mib_byte_exact(server):
    assert (
        ok(twistsock("echo", server.service("echo").target, "--size", str(5 << 20)))
        == b"Received: 5242880 bytes, identical to those sent\n"
    )


def test_echo_binary_from_stdin_streams_the_echo_to_stdout(server):
    data = bytes(range(256)) * 100
    assert ok(twistsock("echo", server.service("echo").target, input=data)) == data


def test_java_tcpclient_upper(server):
    for target in targets(server, "upper"):
        assert ok(twistsock("upper", *target, "hello, world")) == b"FROM SERVER: HELLO, WORLD\n"
    assert (
        ok(twistsock("upper", server.service("upper").target, input=b"from stdin\n"))
        == b"FROM SERVER: FROM STDIN\n"
    )


def test_tutorial_client_ack(server):
    for target in targets(server, "ack"):
        assert (
            ok(twistsock("ack", *target, input=b"Hello from client.c\n")) == b"I got your message\n"
        )
    server.waitFor(r"Here is the message: Hello from client.c$", count=len(targets(server, "ack")))


def test_tutorial_client_prompts_on_a_terminal(server):
    """The prompt appears only when standard input is a terminal."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            ["twistsock", "ack", server.service("ack").target],
            executable=twistsockPath(),
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        seen = readUntil(master, b"Please enter the message: ")
        os.write(master, b"typed by hand\n")
        seen += readUntil(master, b"I got your message")
        assert process.wait(WAIT) == 0
    finally:
        os.close(master)
    assert seen.startswith(b"Please enter the message: ")
    server.waitFor(r"Here is the message: typed by hand$")
    assert b"Please enter" not in ok(
        twistsock("ack", server.service("ack").target, input=b"piped\n")
    )


def twistsockPath() -> str:
    from conftest import TWISTSOCK

    return TWISTSOCK


def readUntil(fd: int, wanted: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + WAIT
    while wanted not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 1024)
    return seen


# -- the client's errors ------------------------------------------------------


def test_client_errors_are_one_line_with_documented_statuses(server, refusedPort):
    echo = server.service("echo").target
    cases = [
        (["echo", "nosuch.invalid", "5000", "x"], 2, b"nosuch.invalid port 5000: unknown host"),
        (["echo", "127.0.0.1", str(refusedPort), "x"], 3, b"connection refused"),
        (
            ["echo", "--timeout", "0.5", server.service("sink").target, "x"],
            4,
            b"timed out after 0.5 s",
        ),
        # upper answers, but not with what was sent.
        (["echo", server.service("upper").target], 5, b"echo mismatch at byte 0 of 4"),
        (["echo", "nosuch:1", "x"], 64, b"give HOST and PORT as two words"),
        (["echo", "nosuch:x:1", "x"], 64, b"bad target"),
    ]
    if server.transport == "unix":
        cases.append(
            (
                ["echo", "unix:path=/nonexistent/echo.sock", "x"],
                3,
                b"connection refused: No such file or directory",
            )
        )
    for argv, status, message in cases:
        result = twistsock(*argv, input=b"abc\n")
        assert result.returncode == status, (argv, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert b"Traceback" not in result.stderr
    # The server is unharmed.
    ok(twistsock("echo", echo, "still here"))


def test_interrupt_ends_the_client_with_status_130(server):
    process = subprocess.Popen(
        [twistsockPath(), "echo", server.service("sink").target, "waiting"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        server.waitFor(
            r"-->waiting$"
        )  # connected and sent: now waiting for an echo that never comes
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 130
    finally:
        process.kill()
        process.wait()
    assert process.stderr.read() == b"twistsock: interrupted\n"
    process.stdout.close()
    process.stderr.close()


# -- the server under misuse ------------------------------------------------


def test_never_reading_client_keeps_server_memory_bounded(server):
    """A client that sends and never reads: the server stops reading instead of buffering it all."""
    before = server.rss()
    s = rawConnect(server, "echo")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    chunk = b"x" * 65536
    sent, limit = 0, 256 << 20
    idle_since = time.monotonic()
    try:
        while sent < limit and time.monotonic() - idle_since < 2.0:
            if select.select([], [s], [], 0.2)[1]:
                try:
                    sent += s.send(chunk)
                    idle_since = time.monotonic()
                except BlockingIOError:
                    pass
        grown = server.rss() - before
    finally:
        s.close()
    # Kernel buffers on both sides hold a few MiB; without backpressure the
    # server would have read and buffered all 256 MiB.
    assert sent < 64 << 20, f"the server kept reading: {sent} bytes accepted"
    assert grown < 32 << 20, f"server memory grew by {grown} bytes"
    ok(twistsock("echo", server.service("echo").target, "still serving"))


def test_half_close_gets_everything_back(server):
    """The peer shuts down its sending side: the server sends back what is pending, then closes."""
    data = os.urandom(4 << 20)
    s = rawConnect(server, "echo")
    received = []
    reader = threading.Thread(target=lambda: received.append(readAll(s)))
    reader.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reader.join(WAIT)
    s.close()
    assert received and received[0] == data


@pytest.mark.parametrize("name", ["upper", "ack"])
def test_line_services_answer_a_last_line_at_half_close(server, name):
    s = rawConnect(server, name)
    s.sendall(b"no newline")
    s.shutdown(socket.SHUT_WR)
    reply = readAll(s)
    s.close()
    assert reply == {"upper": b"NO NEWLINE\n", "ack": b"I got your message"}[name]


def test_longest_line_gets_its_reply_and_the_connection_closes(server):
    """A 64 KiB reply fills the transport's buffer and pauses it: closing must still happen."""
    s = rawConnect(server, "upper")
    s.sendall(b"a" * 65536 + b"\n")
    reply = readAll(s)
    s.close()
    assert reply == b"A" * 65536 + b"\n"


def test_line_too_long_gets_one_error_line(server):
    s = rawConnect(server, "upper")
    s.sendall(b"a" * (64 * 1024 + 10))
    reply = readAll(s)
    s.close()
    assert reply == b"error: line longer than 65536 bytes\n"


def test_binary_input_never_stops_the_server(server):
    junk = bytes(range(256)) * 64 + b"\xff\xfe\xc3(\x00\r\r\n\n"
    for name in SERVICES:
        s = rawConnect(server, name)
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        readAll(s)
        s.close()
    server.waitFor(r"-->\\x00\\x01")
    server.waitFor(r"Here is the message: \\x00\\x01")
    for name, argv, expected in [
        ("echo", ["x y"], b"Received: x y\n"),
        ("upper", ["x y"], b"FROM SERVER: X Y\n"),
        ("ack", ["x y"], b"I got your message\n"),
    ]:
        assert ok(twistsock(name, server.service(name).target, *argv)) == expected


def test_upper_keep_open(short_tmp):
    server = startServer("--keep-open", "--listen", "upper@tcp:0:interface=127.0.0.1")
    try:
        s = rawConnect(server, "upper")
        s.sendall(b"one\r\ntwo\nthree\n")
        s.shutdown(socket.SHUT_WR)
        assert readAll(s) == b"ONE\nTWO\nTHREE\n"
        s.close()
    finally:
        server.stop()


# -- starting the server: addresses and errors ------------------------------


def test_listening_lines_show_service_and_real_address(server):
    assert sorted(entry.service for entry in server.listening) == sorted(SERVICES)
    for entry in server.listening:
        if server.transport == "tcp":
            assert entry.host == "127.0.0.1" and entry.port > 0
        elif server.transport == "tcp6":
            assert entry.host == "::1" and entry.port > 0
        else:
            assert entry.address.endswith(f"/{entry.service}.sock")


def test_port_in_use_is_one_line_and_status_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runTwist(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            f"upper@tcp:{port}:interface=127.0.0.1",
        )
    assert result.returncode == 1
    assert (
        result.stderr
        == f"twistsock: error: cannot listen on tcp:{port}:interface=127.0.0.1 (upper): "
        "Address already in use\n"
    )
    assert "Traceback" not in result.stdout


def test_unix_path_in_missing_directory_is_one_line_and_status_1():
    result = runTwist("--listen", "sink@unix:/nonexistent/dir/s.sock")
    assert result.returncode == 1
    assert (
        result.stderr
        == "twistsock: error: cannot listen on unix:/nonexistent/dir/s.sock (sink): "
        + "No such file or directory\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_privileged_port_not_permitted_is_one_line_and_status_1():
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("port 80 is not privileged on this host")
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            TWIST,
            "sockets",
            "--listen",
            "tcp:80:interface=127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd="/",
        stdin=subprocess.DEVNULL,
    )
    if (
        "Unknown command: sockets" in result.stdout + result.stderr
        or "ermission denied: '" in result.stderr
    ):
        pytest.skip("the unprivileged user cannot read this installation")
    assert result.returncode == 1, result
    assert (
        result.stderr
        == "twistsock: error: cannot listen on tcp:80:interface=127.0.0.1 (echo): "
        + "Permission denied\n"
    )


@pytest.mark.parametrize(
    "listen, message",
    [
        ("nosuch@tcp:0", "unknown service 'nosuch'"),
        ("tcp:notaport", "bad endpoint 'tcp:notaport'"),
        ("tcp:0:interface=::", "bad endpoint"),
        ("nosuchtype:0", "bad endpoint 'nosuchtype:0'"),
    ],
)
def test_malformed_listen_is_one_line_and_status_1_before_listening(listen, message):
    port = freePort()
    result = runTwist("--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", listen)
    assert result.returncode == 1
    assert (
        result.stderr.startswith(f"twistsock: error: {message}") and result.stderr.count("\n") == 1
    )
    assert "listening on" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_default_is_echo_on_port_5000():
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", 5000))
        except OSError:
            pytest.skip("port 5000 is in use on this host")
    server = startServer()
    try:
        assert [(e.service, e.address, e.endpoint) for e in server.listening] == [
            ("echo", "0.0.0.0:5000", "tcp:5000")
        ]
        ok(twistsock("echo", "127.0.0.1", "5000", "default"))
    finally:
        server.stop()


def test_twistd_runs_it_too(short_tmp):
    server = startServer(
        "--listen",
        "upper@tcp:0:interface=127.0.0.1",
        command=(TWISTD, "-n", "--pidfile="),
        cwd=short_tmp,
    )
    try:
        assert (
            ok(twistsock("upper", server.service("upper").target, "twistd"))
            == b"FROM SERVER: TWISTD\n"
        )
    finally:
        server.stop()


def test_sigterm_ends_twist_and_closes_the_unix_socket(short_tmp):
    path = short_tmp / "e.sock"
    server = startServer("--listen", f"unix:{path}")
    assert path.exists()
    assert server.stop() == -15  # twist re-raises SIGTERM: shells see status 143
    assert not path.exists()


def test_any_reactor_works_because_nothing_imports_it_early():
    server = startServer(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        command=(TWIST, "--log-format=text", "--reactor=asyncio"),
    )
    try:
        assert (
            ok(twistsock("echo", server.service("echo").target, "asyncio"))
            == b"Received: asyncio\n"
        )
    finally:
        server.stop()
