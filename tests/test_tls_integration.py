"""
TLS with real processes: `twist sockets` on ssl:, tls: (SNI directory) and
mtls:, driven by the twistsock command and by `openssl s_client`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import WAIT, cutOffWhileSending, requireTool, startServer, twistsock

from twistsock import certs

SERVICES = ("echo", "upper", "sink", "ack")
TRANSPORTS = ("ssl", "tls", "mtls")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    made = certs.generate(tmp_path_factory.mktemp("certs"))
    # tls:DIR must not hold the CA root (see twistsock.tls.checkSNIDirectory).
    sni = made.ca.parent / "sni"
    sni.mkdir()
    shutil.copy(made.server, sni / "server.pem")
    return SimpleNamespace(ca=made.ca, server=made.server, client=made.client, sni=sni)


def endpointFor(transport: str, m) -> str:
    if transport == "ssl":
        return f"ssl:0:privateKey={m.server}:interface=127.0.0.1"
    if transport == "tls":
        return f"tls:{m.sni}:port=0:interface=\\:\\:1"
    return f"mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1"


@pytest.fixture(scope="module")
def server(material):
    """
    Every service over every TLS endpoint type, plus an ssl: port on 127.0.0.2
    for the wrong-name case.
    """
    args = ["--tls-handshake-timeout", "2"]
    for transport in TRANSPORTS:
        for name in SERVICES:
            args += ["--listen", f"{name}@{endpointFor(transport, material)}"]
    args += ["--listen", f"echo@ssl:0:privateKey={material.server}:interface=127.0.0.2"]
    server = startServer(*args)
    yield server
    server.stop()
    assert "Traceback" not in "\n".join(server.lines)


def port(server, name, transport) -> int:
    kind = {"ssl": "ssl:", "tls": "tls:", "mtls": "mtls:"}[transport]
    (entry,) = [
        e
        for e in server.listening
        if e.service == name and e.endpoint.startswith(kind) and "127.0.0.2" not in e.endpoint
    ]
    return entry.port


def target(server, name, transport) -> str:
    host = "[::1]" if transport == "tls" else "localhost"
    return f"tls:{host}:{port(server, name, transport)}"


def tlsArgs(material, transport) -> list[str]:
    args = ["--ca", str(material.ca)]
    return args + ["--cert", str(material.client)] if transport == "mtls" else args


def ok(result) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_service_over_every_tls_endpoint(server, material, transport):
    args = tlsArgs(material, transport)
    assert (
        ok(twistsock("echo", target(server, "echo", transport), *args, "over TLS"))
        == b"Received: over TLS\n"
    )
    assert (
        ok(twistsock("upper", target(server, "upper", transport), *args, "over TLS"))
        == b"FROM SERVER: OVER TLS\n"
    )
    assert (
        ok(twistsock("ack", target(server, "ack", transport), *args, f"ack over {transport}"))
        == b"I got your message\n"
    )
    ok(twistsock("send", target(server, "sink", transport), *args, f"sink over {transport}"))
    server.waitFor(f"Here is the message: ack over {transport}$")
    server.waitFor(f"-->sink over {transport}$")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_empty_input_over_tls_is_a_handshake_then_close_notify(server, material, transport):
    """Nothing to send is still a TLS session: the handshake, then close_notify (status 0)."""
    args = tlsArgs(material, transport)
    name = "mtls" if transport == "mtls" else "tls"  # as records name them
    empty = re.compile(rf" (sink|echo) {name} .*: peer closed after .*, 0 bytes in, 0 bytes out\b")
    failed = re.compile(rf" (sink|echo) {name} .*: tls handshake")
    before = sum(bool(empty.search(line)) for line in server.lines)
    failedBefore = sum(bool(failed.search(line)) for line in server.lines)
    ok(twistsock("send", target(server, "sink", transport), *args, ""))
    assert ok(twistsock("raw", target(server, "echo", transport), *args, input=b"")) == b""
    assert ok(twistsock("echo", target(server, "echo", transport), *args, "")) == b"Received: \n"
    # The server saw three clean sessions with nothing in them, and no failed handshake.
    server.waitFor(empty.pattern, before + 3)
    assert sum(bool(failed.search(line)) for line in server.lines) == failedBefore
    # Nothing to send still checks the server's certificate.
    assert twistsock("echo", target(server, "echo", transport), "").returncode == 6


def test_ipv6_literals_work_with_tls_targets(server, material):
    p = port(server, "upper", "tls")
    for form in (f"tls:[::1]:{p}", f"tls:\\:\\:1:{p}"):
        assert ok(twistsock("upper", form, "--ca", str(material.ca), "v6")) == b"FROM SERVER: V6\n"


def test_echo_5_mib_byte_exact_over_tls(server, material):
    result = twistsock(
        "echo", target(server, "echo", "ssl"), "--ca", str(material.ca), "--size", str(5 << 20)
    )
    assert ok(result) == b"Received: 5242880 bytes, identical to those sent\n"


def test_mtls_logs_the_verified_client_subject(server, material):
    ok(twistsock("echo", target(server, "echo", "mtls"), *tlsArgs(material, "mtls"), "who am I"))
    server.waitFor(
        r"echo mtls 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+: .*, client certificate CN=twistsock "
        r"client$"
    )


# -- the twistsock client's verification ----------------------------------------


def test_wrong_hostname_is_refused_with_status_6(server, material):
    wrong = next(e for e in server.listening if "127.0.0.2" in e.endpoint)
    result = twistsock("echo", f"tls:127.0.0.2:{wrong.port}", "--ca", str(material.ca), "x")
    assert result.returncode == 6
    assert (
        result.stderr
        == f"twistsock: tls:127.0.0.2:{wrong.port}: certificate verification failed: "
        "the certificate is for localhost, 127.0.0.1, ::1, not 127.0.0.2\n".encode()
    )
    # OpenSSL checked the name too, so the server was told why with an alert.
    server.waitFor(
        r"echo tls 127.0.0.1:\d+ -> 127.0.0.2:\d+: tls handshake failed .*\(tls alert bad "
        r"certificate\)$"
    )


def test_untrusted_ca_is_refused_with_status_6(server):
    """Without --ca the platform's trust store is used, and our local CA is not in it."""
    result = twistsock("echo", target(server, "echo", "ssl"), "x")
    assert result.returncode == 6
    assert result.stderr.endswith(
        b": certificate verification failed: unable to get local issuer certificate (not "
        b"signed by a trusted CA; --ca FILE names the CA to trust)\n"
    )


def test_mtls_without_a_client_certificate_fails_with_status_7(server, material):
    result = twistsock("echo", target(server, "echo", "mtls"), "--ca", str(material.ca), "x")
    assert result.returncode == 7
    assert b"TLS handshake failed" in result.stderr and result.stderr.count(b"\n") == 1
    server.waitFor(r"echo mtls .*: tls handshake failed .*\(peer did not return a certificate\)$")


# -- openssl s_client, an independent client -------------------------------------


def sClient(
    port: int, *args: str, host: str = "127.0.0.1", input: bytes = b""
) -> subprocess.CompletedProcess:
    requireTool("openssl")
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "-servername",
            "localhost",
            *args,
        ],
        input=input,
        capture_output=True,
        timeout=WAIT,
    )


def test_tls_1_1_is_refused_and_1_2_and_1_3_accepted(server, material):
    p = port(server, "echo", "ssl")
    # SECLEVEL=0 lets this OpenSSL offer TLS 1.1 at all: the refusal is the server's.
    old = sClient(p, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0
    assert b"alert protocol version" in old.stderr + old.stdout
    server.waitFor(r"echo tls .*: tls handshake failed .*\(unsupported protocol\)$")
    for version, name in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
        new = sClient(p, version, "-CAfile", str(material.ca), "-verify_return_error")
        assert new.returncode == 0, new.stderr
        assert b"Protocol  : " + name in new.stdout or b"New, " + name in new.stdout
        assert b"Verify return code: 0 (ok)" in new.stdout


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_endpoint_accepts_only_forward_secret_aead_suites_in_tls_1_2(
    server, material, transport
):
    common = ["-tls1_2", "-CAfile", str(material.ca), "-cert", str(material.client)]
    p = port(server, "echo", transport)
    for cbcOrCCM in (
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-ECDSA-AES128-CCM",
    ):
        assert (
            sClient(
                p, *common, "-cipher", cbcOrCCM, host="::1" if transport == "tls" else "127.0.0.1"
            ).returncode
            != 0
        ), cbcOrCCM
    for aead in (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ):
        accepted = sClient(
            p, *common, "-cipher", aead, host="::1" if transport == "tls" else "127.0.0.1"
        )
        assert accepted.returncode == 0 and aead.encode() in accepted.stdout, aead


def test_s_client_without_a_client_certificate_is_refused_by_mtls(server, material):
    p = port(server, "ack", "mtls")
    refused = sClient(p, "-tls1_2", "-CAfile", str(material.ca), input=b"hello\n")
    assert refused.returncode != 0
    assert b"I got your message" not in refused.stdout
    accepted = sClient(
        p,
        "-CAfile",
        str(material.ca),
        "-cert",
        str(material.client),
        "-quiet",
        input=b"hello from s_client\n",
    )
    assert b"I got your message" in accepted.stdout
    server.waitFor(r"Here is the message: hello from s_client$")


def test_s_client_echo_5_mib_byte_exact(server, material):
    requireTool("openssl")
    data = os.urandom(5 << 20)
    process = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            f"127.0.0.1:{port(server, 'echo', 'ssl')}",
            "-CAfile",
            str(material.ca),
            "-verify_return_error",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    writer = threading.Thread(target=lambda: (process.stdin.write(data), process.stdin.flush()))
    writer.start()
    received = bytearray()
    deadline = time.monotonic() + WAIT
    try:
        while len(received) < len(data) and time.monotonic() < deadline:
            chunk = process.stdout.read1(1 << 20)
            if not chunk:
                break
            received += chunk
    finally:
        writer.join(WAIT)
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()
    assert len(received) == len(data)
    assert bytes(received) == data


# -- bad clients: one line each, and the others keep being served --------------------


def rawTLSPort(server, transport="ssl") -> int:
    return port(server, "echo", transport)


@pytest.mark.parametrize(
    "payload, detail",
    [
        (b"GET / HTTP/1.0\r\n\r\n", r"(http request|wrong version number)"),
        (bytes(range(256)) * 4, r"[a-z ]+"),
    ],
)
def test_plain_text_and_garbage_are_one_line_each(server, material, payload, detail):
    with socket.create_connection(("127.0.0.1", rawTLSPort(server)), timeout=WAIT) as s:
        me = s.getsockname()[1]
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    lines = server.waitFor(rf"127\.0\.0\.1:{me} ")
    assert len(lines) == 1
    assert re.search(
        r"echo tls 127\.0\.0\.1:\d+ -> .*: tls handshake failed .*\(" + detail + r"\)$", lines[0]
    ), lines
    ok(twistsock("echo", target(server, "echo", "ssl"), "--ca", str(material.ca), "still serving"))


def mtlsEcho(port: int, material, data: bytes) -> bytes:
    """One echo over mtls: from Python's ssl module, with the client certificate."""
    import ssl

    context = ssl.create_default_context(cafile=str(material.ca))
    context.load_cert_chain(str(material.client))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = s.recv(65536)
            assert chunk, received
            received += chunk
        return received


def stillOpen(s: socket.socket) -> bool:
    """Whether the server has neither closed nor reset C{s}, which expects nothing."""
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        s.settimeout(WAIT)


def test_half_finished_handshake_times_out_while_others_are_served(server, material):
    with socket.create_connection(("127.0.0.1", rawTLSPort(server, "mtls")), timeout=WAIT) as s:
        me = s.getsockname()[1]
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        # Meanwhile another client is served (from this process: milliseconds, not the seconds
        # of starting a command, against the 2 s deadline)...
        assert mtlsEcho(port(server, "echo", "mtls"), material, b"not blocked") == b"not blocked"
        # ...while the half-finished one is still waiting.
        assert stillOpen(s), "the half-finished handshake was closed before the other was served"
        try:
            assert s.recv(100) == b""  # closed by the server at its deadline...
        except ConnectionResetError:
            pass  # ...by an abort, which may send a reset
    (line,) = server.waitFor(rf"127\.0\.0\.1:{me} ")
    assert re.search(
        r"echo mtls .*: tls handshake timeout after .*\(no handshake within 2 s\)$", line
    ), line


@pytest.mark.parametrize("leftover", [b"", b"z"])
@pytest.mark.parametrize("service", ["upper", "ack"])
def test_a_client_that_never_stops_sending_after_its_reply_is_cut_off(
    server, material, service, leftover
):
    """
    After a line service's reply, TLS waits for the client's close_notify with
    the connection open; a client that keeps sending instead is dropped
    within the bounds of plain TCP (256 KiB, the line deadline), whether its
    extra bytes came with its line or after the reply.
    """
    import ssl

    context = ssl.create_default_context(cafile=str(material.ca))
    raw = socket.create_connection(("127.0.0.1", port(server, service, "ssl")), timeout=WAIT)
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"one\n" + leftover)
        reply = b""
        while not reply.endswith((b"\n", b"message")):
            chunk = s.recv(100)
            assert chunk, reply
            reply += chunk
        clientPort = s.getsockname()[1]
        # 25 MiB at most: the limit, both sockets' buffers, TLS records.
        assert cutOffWhileSending(s, b"z" * 65536, 400)
    (record,) = server.waitFor(rf"{service} tls 127\.0\.0\.1:{clientPort} -> .*: \w+")
    assert ": service closed after" in record, record


def test_a_client_that_trickles_after_its_reply_is_cut_at_the_line_deadline(material):
    """Within the line deadline, as over TCP; the record says the service closed."""
    import ssl

    server = startServer("--line-timeout", "1", "--listen", f"upper@{endpointFor('ssl', material)}")
    try:
        context = ssl.create_default_context(cafile=str(material.ca))
        raw = socket.create_connection(("127.0.0.1", port(server, "upper", "ssl")), timeout=WAIT)
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"hello\n")
            assert s.recv(100) == b"HELLO\n"
            clientPort = s.getsockname()[1]
            # A byte every 0.2 s, for WAIT seconds at most.
            assert cutOffWhileSending(s, b"x", int(WAIT * 5), pause=0.2)
        (record,) = server.waitFor(rf"upper tls 127\.0\.0\.1:{clientPort} -> ")
        assert ": service closed after" in record, record
    finally:
        server.stop()


@pytest.mark.parametrize("service", ["upper", "ack"])
def test_a_service_that_closes_sends_close_notify_then_the_end_of_the_stream(
    server, material, service
):
    """
    A client that waits for the end of the TCP stream, not for TLS's, is not
    held until the idle timeout; and one that closes without a close_notify of
    its own, as Python's ssl does, ends the connection cleanly: 'service closed'.
    """
    import ssl

    context = ssl.create_default_context(cafile=str(material.ca))
    raw = socket.create_connection(("127.0.0.1", port(server, service, "ssl")), timeout=WAIT)
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"hello\n")
        received = b""
        while chunk := s.recv(100):  # until the server's close_notify
            received += chunk
        assert received == (b"HELLO\n" if service == "upper" else b"I got your message")
        # Beneath TLS, the server's FIN follows its close_notify.
        with socket.socket(fileno=os.dup(s.fileno())) as beneath:
            beneath.settimeout(WAIT)
            assert beneath.recv(100) == b""
        clientPort = s.getsockname()[1]
    (record,) = server.waitFor(rf"{service} tls 127\.0\.0\.1:{clientPort} -> .*: \w+")
    assert f"{service} tls 127.0.0.1:{clientPort} -> " in record
    assert ": service closed after" in record, record
