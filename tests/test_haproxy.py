"""
Behind a real HAProxy (TCP mode): PROXY v2 in front of plain TCP, PROXY v1 in
front of TLS pass-through. Clients connect from 127.0.0.5 so that the real
peer can be told from HAProxy's own address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
from conftest import BIN, WAIT, freePort, requireTool, startServer, twistsock

from twistsock import certs

CLIENT = "127.0.0.5"


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return certs.generate(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stack(material, tmp_path_factory):
    haproxy = requireTool("haproxy")
    m = material
    backends = {
        "echo": ("echo@proxy:tcp:0:interface=127.0.0.1", "send-proxy-v2"),
        "sink": ("sink@proxy:tcp:0:interface=127.0.0.1", "send-proxy-v2"),
        "tls": (f"echo@proxy:ssl:0:privateKey={m.server}:interface=127.0.0.1", "send-proxy"),
        "mtls": (
            f"ack@proxy:mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1",
            "send-proxy",
        ),
    }
    args = [a for listen, _ in backends.values() for a in ("--listen", listen)]
    server = startServer(*args)
    ports = {}
    for key, (listen, _) in backends.items():
        (entry,) = [e for e in server.listening if f"{e.service}@{e.endpoint}" == listen]
        ports[key] = entry.port
    fronts = {key: freePort() for key in backends}
    config = (
        "global\n    maxconn 512\n\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n"
        "    timeout client 30s\n    timeout server 30s\n"
    )
    for key, (_, proxy) in backends.items():
        config += (
            f"\nfrontend fe_{key}\n    bind 127.0.0.1:{fronts[key]}\n    default_backend be_{key}\n"
        )
        config += f"\nbackend be_{key}\n    server s1 127.0.0.1:{ports[key]} {proxy}\n"
    path = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    path.write_text(config)
    process = subprocess.Popen(
        [haproxy, "-f", str(path), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for port in fronts.values():
            waitForPort(port, process)
        yield fronts, server, m
    finally:
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        server.stop()
        assert "Traceback" not in "\n".join(server.lines)


def waitForPort(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"haproxy does not listen on {port}")


def via(port: int, scheme: str = "tcp", host: str = "127.0.0.1") -> str:
    return f"{scheme}:{host}:{port}:bindAddress={CLIENT}"


def test_plain_tcp_with_proxy_v2_logs_the_real_client(stack):
    fronts, server, _ = stack
    result = twistsock("echo", via(fronts["echo"]), "through haproxy")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Received: through haproxy\n"
    server.waitFor(
        rf"echo proxy 127\.0\.0\.5:\d+ -> 127\.0\.0\.1:{fronts['echo']}: .*15 bytes in, 15 "
        r"bytes out$"
    )


def test_sink_sees_the_real_client(stack):
    fronts, server, _ = stack
    assert twistsock("send", via(fronts["sink"]), "who sent this").returncode == 0
    server.waitFor(r"\] 127\.0\.0\.5:\d+ -->who sent this$")


def test_tls_pass_through_with_proxy_v1(stack):
    fronts, server, m = stack
    result = twistsock(
        "echo", via(fronts["tls"], "tls", "localhost"), "--ca", str(m.ca), "--size", str(1 << 20)
    )
    assert result.returncode == 0, result.stderr
    server.waitFor(r"echo proxy\+tls 127\.0\.0\.5:\d+ -> .*1048576 bytes in, 1048576 bytes out$")


def test_mutual_tls_pass_through_logs_client_and_certificate(stack):
    fronts, server, m = stack
    result = twistsock(
        "ack",
        via(fronts["mtls"], "tls", "localhost"),
        "--ca",
        str(m.ca),
        "--cert",
        str(m.client),
        "mtls behind haproxy",
    )
    assert result.stdout == b"I got your message\n", result.stderr
    server.waitFor(r"\] 127\.0\.0\.5:\d+ Here is the message: mtls behind haproxy$")
    server.waitFor(
        r"ack proxy\+mtls 127\.0\.0\.5:\d+ -> .*, client certificate CN=twistsock client$"
    )


@pytest.mark.parametrize("endpoint", ["haproxy:tcp:0", "upper@haproxy:ssl:0:privateKey=server.pem"])
def test_twisteds_haproxy_wrapper_is_refused_with_a_pointer_to_proxy(endpoint):
    """Twisted's haproxy: loses an echo reply after the client half-closes (see the README)."""
    result = subprocess.run(
        [str(BIN / "twist"), "sockets", "--listen", endpoint],
        capture_output=True,
        timeout=WAIT,
        text=True,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert (
        "haproxy: is not served" in line and f"use proxy:{endpoint.split('haproxy:', 1)[1]}" in line
    )


def test_half_close_passes_through_haproxy_and_proxy(stack):
    fronts, server, _ = stack
    data = os.urandom(1 << 20)
    with socket.socket() as s:
        s.bind((CLIENT, 0))
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", fronts["echo"]))
        received = []

        def read():
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            received.append(b"".join(chunks))

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reader.join(WAIT)
    assert received == [data]


def test_a_proxy_port_refuses_a_client_without_a_header(stack):
    _, server, _ = stack
    port = next(
        e.port
        for e in server.listening
        if e.endpoint.startswith("proxy:tcp") and e.service == "echo"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        me = s.getsockname()[1]
        s.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1 2 3\r\nspoofed")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    (line,) = server.waitFor(
        rf"echo proxy 127\.0\.0\.1:{me} -> .*: proxy header invalid after .*\(malformed v1 "
        r"header, first bytes: PROXY TCP4 6\.6\.6\.6"
    )
    assert not [
        line for line in server.lines if " proxy 6.6.6.6:" in line
    ]  # the spoofed client is never taken for the peer


def test_sslyze_through_haproxy_finds_proxy_tls_endpoints_compliant(stack):
    """sslyze cannot send a PROXY header; HAProxy in TCP pass-through does, as in production."""
    from test_tls_peers import sslyze

    fronts, server, m = stack
    result = sslyze(
        "--mozilla_config=intermediate",
        f"--certinfo_ca_file={m.ca}",
        f"localhost:{fronts['tls']}{{127.0.0.1}}",
    )
    assert result.returncode == 0 and "OK - Compliant." in result.stdout, result.stdout
    result = sslyze(
        "--mozilla_config=intermediate",
        f"--certinfo_ca_file={m.ca}",
        f"--cert={m.client}",
        f"--key={m.client}",
        f"localhost:{fronts['mtls']}{{127.0.0.1}}",
    )
    assert result.returncode == 0 and "OK - Compliant." in result.stdout, result.stdout
