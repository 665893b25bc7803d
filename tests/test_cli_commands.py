"""The twistsock command: messages each command refuses, certs --days, zsh completion."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from twistsock import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["raw", "tcp:127.0.0.1:1", "hello"], "raw takes no MESSAGE: it sends standard input"),
        (["upper", "tcp:127.0.0.1:1", "one\ntwo"], "LINE must be one line"),
        (["ack", "tcp:127.0.0.1:1", "one\ntwo"], "MESSAGE must be one line"),
        (["certs", "x", "--days", "0"], "must be from 1 to"),
    ],
)
def test_a_message_the_command_cannot_send_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_certs_days_sets_how_long_the_server_and_client_certificates_are_valid(tmp_path, capsys):
    cli.main(["certs", str(tmp_path / "c"), "--days", "30"])
    for name in ("server.pem", "client.pem"):
        pem = (tmp_path / "c" / name).read_bytes()
        certificate = x509.load_pem_x509_certificate(
            pem[pem.index(b"-----BEGIN CERTIFICATE-----") :]
        )
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        assert lifetime <= datetime.timedelta(days=30), name
        assert lifetime > datetime.timedelta(days=29), name


def test_the_zsh_completion_loads_bash_completion_first(capsys):
    cli.main(["completion", "zsh"])
    script = capsys.readouterr().out
    assert script.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    assert "complete -o default -F _twistsock twistsock" in script
