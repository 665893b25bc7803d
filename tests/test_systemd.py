"""
Socket activation with systemd-socket-activate (Debian package systemd), and
the unit files in contrib/systemd: checked by systemd-analyze, and their own
commands run under socket activation.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import TWIST, WAIT, freePort, requireTool, spawn, twistsock

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def activated(port: int, fdname: str | None, command: list[str]):
    """
    `command` under systemd-socket-activate, which holds 127.0.0.1:port and
    starts it on the first connection.
    """
    tool = requireTool("systemd-socket-activate")
    names = [f"--fdname={fdname}"] if fdname else []
    return spawn([tool, "-l", f"127.0.0.1:{port}", *names, *command])


def stop(server) -> None:
    server.stop()
    assert "Traceback" not in "\n".join(server.lines), server.lines


@pytest.mark.parametrize("selector", ["name=echo", "index=0"])
def test_socket_activation(selector):
    port = freePort()
    server = activated(
        port,
        "echo",
        [
            TWIST,
            "--log-format=text",
            "sockets",
            "--listen",
            f"upper@systemd:domain=INET:{selector}",
        ],
    )
    try:
        result = twistsock("upper", "127.0.0.1", str(port), "socket activated")
        assert result.stdout == b"FROM SERVER: SOCKET ACTIVATED\n", (result.stderr, server.lines)
        server.waitFor(
            rf"upper listening on 127\.0\.0\.1:{port} \(systemd:domain=INET:{selector}\)"
        )
        server.waitFor(rf"upper tcp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{port}: service closed")
    finally:
        stop(server)


def test_without_socket_names_the_error_says_what_is_missing():
    port = freePort()
    server = activated(
        port, None, [TWIST, "sockets", "--listen", "echo@systemd:domain=INET:index=0"]
    )
    try:
        twistsock("echo", "127.0.0.1", str(port), "x", "--timeout", "5")
        line = server.waitFor(r"twistsock: error: bad endpoint")[0]
        assert "FileDescriptorName=" in line
    finally:
        stop(server)


def unit(name: str) -> dict[str, list[str]]:
    """The settings of a unit file, joined continuation lines and all."""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_files_pass_systemd_analyze(tmp_path):
    analyze = requireTool("systemd-analyze")
    for path in UNITS.iterdir():
        # The instances of the templates, and our own twist where the units say /opt/twistsock.
        target = tmp_path / path.name.replace("@.", "@echo.")
        target.write_text(path.read_text().replace("/opt/twistsock/bin/twist", TWIST))
    result = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def execStart(
    service: str, instance: str | None = None, environment: dict[str, str] | None = None
) -> list[str]:
    command = unit(service)["ExecStart"][0]
    if instance:
        command = command.replace("%i", instance)
    for key, value in (environment or {}).items():
        command = command.replace(f"${{{key}}}", value)
    argv = shlex.split(command)
    argv[0] = TWIST
    return argv


def test_the_shipped_service_runs_under_socket_activation():
    socket_ = unit("twistsock.socket")
    service = unit("twistsock.service")
    assert service["SuccessExitStatus"] == ["143"]
    argv = execStart("twistsock.service")
    metrics = freePort()
    argv = [re.sub(r"^tcp:9100:", f"tcp:{metrics}:", a) for a in argv]
    # The unit listens on [::]:5000 with BindIPv6Only=both: INET6; here we hold 127.0.0.1, so INET.
    argv = [a.replace("domain=INET6", "domain=INET") for a in argv]
    port = freePort()
    server = activated(port, socket_["FileDescriptorName"][0], argv)
    try:
        result = twistsock("echo", "127.0.0.1", str(port), "from the unit's own command")
        assert result.stdout == b"Received: from the unit's own command\n", (
            result.stderr,
            server.lines,
        )
        server.waitFor(rf"metrics listening on 127\.0\.0\.1:{metrics}")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(WAIT) in (-signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        stop(server)


def test_the_template_serves_any_service_by_instance_name():
    socket_ = unit("twistsock@.socket")
    assert socket_["FileDescriptorName"] == ["%i"]
    port = freePort()
    argv = execStart("twistsock@.service", "ack", {"TWISTSOCK_DOMAIN": "INET"})
    server = activated(port, "ack", argv)
    try:
        result = twistsock("ack", "127.0.0.1", str(port), "one instance per service")
        assert result.stdout == b"I got your message\n", (result.stderr, server.lines)
    finally:
        stop(server)
