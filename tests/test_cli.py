"""The twistsock command's argument handling (the exchanges run in test_integration)."""

from __future__ import annotations

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
    "argv, message",
    [
        ([], "required"),
        (["nosuch", "tcp:127.0.0.1:1"], "invalid choice"),
        (["echo", "localhost"], "neither an endpoint string"),
        (["echo", "nosuch:1", "x"], "bad target 'nosuch:1'"),
        (["echo", "localhost", "99999", "x"], "between 1 and 65535"),
        (["echo", "tcp:127.0.0.1:1", "--size", "-1"], "must be 0 or more"),
        (["echo", "tcp:127.0.0.1:1", "x", "--size", "3"], "either a MESSAGE or --size"),
        (["upper", "tcp:127.0.0.1:1", "--timeout", "0", "x"], "must be more than 0"),
        (["echo", "ssl:localhost:3443", "x"], "ssl: targets do not check the server's certificate; use tls:HOST:PORT"),
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
    statuses = {cls.exitStatus: cls for cls in (client.ConnectionFailed, client.UnknownHost, client.ConnectionRefused, client.Timeout, client.EchoMismatch, client.CertificateError, client.TLSFailed)}
    assert set(statuses) | {0, 64, 130} == set(cli.EXIT_STATUSES)


@pytest.mark.parametrize("command", [[], ["send"], ["echo"], ["upper"], ["ack"], ["udp"], ["certs"]])
def test_every_help_prints_and_exits_0(command, capsys):
    # certs --help once died in argparse (a positional's %(default)s under parse_intermixed_args).
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: twistsock" in capsys.readouterr().out
