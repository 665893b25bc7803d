"""The twistsock command's argument handling (the exchanges run in test_integration)."""

from __future__ import annotations

import re

import pytest

from twistsock import cli, client


@pytest.mark.parametrize(
    "words, target, rest",
    [
        (["tcp:127.0.0.1:5000"], "tcp:127.0.0.1:5000", []),
        (["tcp:127.0.0.1:5000", "hello", "world"], "tcp:127.0.0.1:5000", ["hello", "world"]),
        (["unix:path=/tmp/s.sock", "x"], "unix:path=/tmp/s.sock", ["x"]),
        (["localhost", "5000"], ("localhost", 5000), []),
        (["::1", "5000", "msg"], ("::1", 5000), ["msg"]),
        (["fe80::1", "7"], ("fe80::1", 7), []),
        (["127.0.0.1", "6789", "a", "b"], ("127.0.0.1", 6789), ["a", "b"]),
    ],
)
def test_split_target(words, target, rest):
    assert cli.splitTarget(words) == (target, rest)


@pytest.mark.parametrize("words", [["localhost"], ["localhost", "http"], ["::1"]])
def test_split_target_errors(words):
    with pytest.raises(ValueError):
        cli.splitTarget(words)


@pytest.mark.parametrize(
    "word, hint",
    [
        ("[::1]:5000", "(::1 5000)"),
        ("localhost:5000", "(localhost 5000)"),
        ("127.0.0.1:5000", "(127.0.0.1 5000)"),
    ],
)
def test_host_and_port_in_one_word_get_a_hint(word, hint):
    with pytest.raises(
        ValueError,
        match="give HOST and PORT as two words " + re.escape(hint),
    ):
        cli.splitTarget([word, "hi"])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["nosuch", "tcp:127.0.0.1:1"], "invalid choice"),
        (["echo", "localhost"], "neither an endpoint string"),
        (["echo", "nosuch:1", "x"], "'nosuch:1': give HOST and PORT as two words (nosuch 1)"),
        (["echo", "localhost", "99999", "x"], "between 1 and 65535"),
        (["echo", "tcp:127.0.0.1:1", "--size=-1"], "must be 0 or more"),
        (["echo", "tcp:127.0.0.1:1", "--size", "5000000000"], "at most 67108864 (64 MiB"),
        (["echo", "tcp:127.0.0.1:1", "x", "--size", "3"], "either a MESSAGE or --size"),
        (["upper", "tcp:127.0.0.1:1", "--timeout", "0", "x"], "must be more than 0"),
        (
            ["echo", "ssl:localhost:3443", "x"],
            "ssl: targets do not check the server's certificate; use tls:HOST:PORT",
        ),
    ],
)
def test_usage_errors_exit_64_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.endswith(" --help shows the usage)\n"), err
    assert "Traceback" not in err


def test_exit_statuses_are_the_client_errors():
    """The documented table and the exception classes agree."""
    statuses = {
        cls.exitStatus: cls
        for cls in (
            client.ConnectionFailed,
            client.UnknownHost,
            client.ConnectionRefused,
            client.Timeout,
            client.EchoMismatch,
            client.CertificateError,
            client.TLSFailed,
            client.ServerError,
        )
    }
    assert set(statuses) | {0, 64, 130} == set(cli.EXIT_STATUSES)


@pytest.mark.parametrize(
    "command", [[], ["send"], ["echo"], ["upper"], ["ack"], ["udp"], ["certs"]]
)
def test_every_help_prints_and_exits_0(command, capsys):
    # certs --help once died in argparse (a positional's %(default)s under parse_intermixed_args).
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: twistsock" in capsys.readouterr().out


# -- through a subprocess: one line and a documented status, never a traceback --

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from conftest import TWISTSOCK, WAIT, freePort, startServer, twistsock  # noqa: E402


def test_a_server_error_reply_exits_8():
    server = startServer("--listen", "upper@tcp:0:interface=127.0.0.1", "--max-line", "10")
    try:
        result = twistsock("upper", "127.0.0.1", str(server.service("upper").port), "x" * 20)
    finally:
        server.stop()
    assert result.returncode == 8, result.stderr
    assert result.stderr.decode().splitlines() == [
        f"twistsock: 127.0.0.1 port {server.service('upper').port}: the server answered with "
        "an error: line longer than 10 bytes"
    ]


def waitUntilReadingStandardInput(pid: int) -> None:
    """Until the process blocks in read(0, ...) (Linux x86-64: syscall 0, first argument 0)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/syscall").read().startswith("0 0x0 "):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError("the client never waited for standard input")


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_standard_input_exits_130_in_one_line(number):
    process = subprocess.Popen(
        [TWISTSOCK, "ack", "127.0.0.1", str(freePort())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        waitUntilReadingStandardInput(process.pid)
        process.send_signal(number)
        out, err = process.communicate(timeout=WAIT)
    finally:
        process.stdin.close()
    assert process.returncode == 130
    assert err.decode().strip() == "twistsock: interrupted" and b"Traceback" not in err


@pytest.mark.parametrize(
    "target, size, limit", [("127.0.0.1", 65508, 65507), ("::1", 65528, 65527)]
)
def test_an_oversized_datagram_is_a_usage_error(target, size, limit):
    result = twistsock("udp", target, "9", "x" * size)
    assert result.returncode == 64
    (line,) = result.stderr.decode().splitlines()
    assert f"holds at most {limit} bytes, not {size}" in line


def test_a_bracketed_ipv6_tcp_target_and_a_fractional_timeout():
    server = startServer("--listen", "echo@tcp6:0:interface=\\:\\:1")
    try:
        port = server.service("echo").port
        result = twistsock("echo", f"tcp:[::1]:{port}:timeout=2.5", "hi")
    finally:
        server.stop()
    assert (result.returncode, result.stdout) == (0, b"Received: hi\n"), result.stderr


def test_ipv4_or_ipv6_only():
    server = startServer(
        "--listen", "echo@tcp:0:interface=127.0.0.1", "--listen", "echo@tcp6:0:interface=\\:\\:1"
    )
    try:
        v4, v6 = (
            e.port for e in sorted(server.listening, key=lambda e: e.endpoint.startswith("tcp6"))
        )
        assert twistsock("echo", "-4", "127.0.0.1", str(v4), "four").stdout == b"Received: four\n"
        assert twistsock("echo", "-6", "::1", str(v6), "six").stdout == b"Received: six\n"
        assert twistsock("echo", "-6", f"tcp:[::1]:{v6}", "six").stdout == b"Received: six\n"
        wrong = twistsock("echo", "-6", "127.0.0.1", str(v4), "x")
        assert wrong.returncode == 64 and "IPv6 only (-6) was asked for" in wrong.stderr.decode()
        unix = twistsock("echo", "-4", "unix:path=/tmp/nothing.sock", "x")
        assert (
            unix.returncode == 64
            and "needs a HOST PORT, tcp: or tls: target" in unix.stderr.decode()
        )
        both = twistsock("echo", "-4", "-6", "127.0.0.1", str(v4), "x")
        assert both.returncode == 64
    finally:
        server.stop()


def test_verbose_says_where_it_connected_and_what_tls_it_got(tmp_path):
    from twistsock import certs

    material = certs.generate(tmp_path / "certs")
    server = startServer(
        "--listen",
        "echo@tcp:0:interface=127.0.0.1",
        "--listen",
        f"echo@ssl:0:privateKey={material.server}:interface=127.0.0.1",
    )
    try:
        ports = {e.endpoint.split(":")[0]: e.port for e in server.listening}
        plain = twistsock("echo", "-v", "127.0.0.1", str(ports["tcp"]), "hi")
        tls = twistsock(
            "echo", "--verbose", f"tls:localhost:{ports['ssl']}", "--ca", str(material.ca), "hi"
        )
    finally:
        server.stop()
    assert plain.stdout == b"Received: hi\n"
    first, last = plain.stderr.decode().splitlines()
    assert first.startswith(
        f"twistsock: connected to 127.0.0.1:{ports['tcp']} from 127.0.0.1:"
    ) and last.endswith(" s in all")
    lines = tls.stderr.decode().splitlines()
    assert (
        lines[1].startswith("twistsock: TLS: TLSv1.3, TLS_")
        and "server certificate CN=localhost, issued by CN=twistsock local CA" in lines[1]
    )


def test_bash_completion_completes_commands_and_options():
    script = subprocess.run(
        [TWISTSOCK, "completion", "bash"], capture_output=True, text=True, timeout=WAIT
    ).stdout
    probe = (
        'COMP_WORDS=(twistsock ec); COMP_CWORD=1; _twistsock; echo "${COMPREPLY[@]}"; '
        'COMP_WORDS=(twistsock udp --no); COMP_CWORD=2; _twistsock; echo "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", script + "\n" + probe], capture_output=True, text=True, timeout=WAIT
    )
    assert result.stdout.splitlines() == ["echo", "--no-reply"], result.stderr


def test_send_passes_on_the_servers_error_reply():
    server = startServer("--listen", "upper@tcp:0:interface=127.0.0.1", "--max-line", "10")
    try:
        result = twistsock("send", "127.0.0.1", str(server.service("upper").port), "x" * 100)
        streamed = twistsock(
            "send", "127.0.0.1", str(server.service("upper").port), input=b"x" * 100
        )
    finally:
        server.stop()
    for outcome_ in (result, streamed):
        assert outcome_.returncode == 8 and "line longer than 10 bytes" in outcome_.stderr.decode()


def test_a_full_standard_output_is_one_line_and_status_1():
    server = startServer("--listen", "echo@tcp:0:interface=127.0.0.1")
    try:
        with open("/dev/full", "wb") as full:
            result = subprocess.run(
                [TWISTSOCK, "echo", "127.0.0.1", str(server.service("echo").port), "hi"],
                stdout=full,
                stderr=subprocess.PIPE,
                timeout=WAIT,
            )
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "twistsock: cannot write the reply to standard output: No space left on device"
    ]
