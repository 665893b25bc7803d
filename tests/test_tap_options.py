"""`twist sockets` option errors: each is one line naming the option, and exit status 1."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import TWIST, WAIT

from twistsock import workers
from twistsock.tap import ConfigurationError, Options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tls-handshake-timeout", "0"], "--tls-handshake-timeout must be more than 0"),
        (
            ["--max-per-peer", "-1"],
            "--max-connections, --max-per-peer, --idle-timeout and --drain-timeout"
            " must be 0 or more",
        ),
        (
            ["--line-timeout", "-1"],
            "--line-timeout and --proxy-header-timeout must be 0 or more",
        ),
        (["--metrics", "nosuch:9100"], "--metrics: bad endpoint 'nosuch:9100'"),
        (
            ["--udp-blocked-ports", "7,x"],
            "--udp-blocked-ports: '7,x' is not 'reflecting', 'none' or a list of ports",
        ),
        (["--udp-blocked-ports", "7,70000"], "--udp-blocked-ports: ports are 0 to 65535"),
        (
            ["--peer-network", "24"],
            "--peer-network: '24' is not two prefix lengths such as 32,64",
        ),
        (
            ["--peer-network", "33,64"],
            "--peer-network: '33,64': the IPv4 prefix is 0 to 32, the IPv6 one 0 to 128",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(argv, message, capsys):
    with pytest.raises(ConfigurationError) as raised:
        Options().parseOptions(argv)
    assert raised.value.code == 1
    assert raised.value.message.startswith(message)
    err = capsys.readouterr().err
    assert err.startswith(f"twistsock: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(
    "text, ports",
    [("none", {0}), ("7, 19,", {0, 7, 19}), ("reflecting", None)],
)
def test_udp_blocked_ports_always_include_port_0(text, ports):
    options = Options()
    options.parseOptions(["--udp-blocked-ports", text])
    blocked = options["udp-blocked-ports"]
    assert 0 in blocked
    if ports is not None:
        assert blocked == ports


def test_the_worker_variable_is_refused_when_it_does_not_come_from_a_master():
    """A user who sets TWISTSOCK_WORKER by hand gets one line, not a traceback."""
    result = subprocess.run(
        [TWIST, "sockets", "--listen", "tcp:0:interface=127.0.0.1"],
        env={**os.environ, workers.WORKER: "nonsense"},
        capture_output=True,
        text=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"twistsock: error: {workers.WORKER} is for a --workers master's use"
        " (twist sockets --help lists the options)\n"
    )
