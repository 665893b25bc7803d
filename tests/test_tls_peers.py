"""
twistsock's TLS as software nobody on this project wrote sees it: sslyze's
Mozilla-profile checks, testssl.sh's client simulations, `openssl s_client`
and curl offering ALPN, Python's `ssl` module sending close_notify, and
certificates with no or the wrong subjectAltName made here with
`cryptography`, refused by the twistsock client.
"""

from __future__ import annotations

import datetime
import select
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import WAIT, requireTool, startServer, twistsock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twistsock import certs

ROOT = Path(__file__).resolve().parent.parent


def sslyzeCommand() -> str:
    """
    sslyze lives in a venv of its own (.ci/run makes it): it pins a
    cryptography older than ours.
    """
    local = ROOT / ".venv-sslyze" / "bin" / "sslyze"
    if local.exists():
        return str(local)
    return requireTool("sslyze")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    base = tmp_path_factory.mktemp("peers")
    made = certs.generate(base / "main")
    modern = certs.generate(base / "modern", days=90)
    other = certs.generate(base / "other", ["b.test"])
    sni = base / "sni"
    sni.mkdir()
    shutil.copy(made.server, sni / "a-server.pem")
    shutil.copy(made.ca, sni / "ca.pem")  # a root beside the keys: left out of every chain
    # b.test's certificate, signed by another CA, without "localhost" first:
    # keep only the names that differ.
    shutil.copy(other.server, sni / "b-server.pem")
    return SimpleNamespace(
        ca=made.ca,
        server=made.server,
        client=made.client,
        modern=modern,
        other=other,
        sni=sni,
        base=base,
    )


ENDPOINTS = {
    "ssl": "echo@ssl:0:privateKey={m.server}:interface=127.0.0.1",
    "tls": "echo@tls:{m.sni}:port=0:interface=127.0.0.1",
    "mtls": "echo@mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1",
    "proxy+ssl": "echo@proxy:ssl:0:privateKey={m.server}:interface=127.0.0.1",
    "proxy+mtls": "echo@proxy:mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1",
    "modern": "echo@ssl:0:privateKey={m.modern.server}:interface=127.0.0.1:profile=modern",
    "upper": "upper@ssl:0:privateKey={m.server}:interface=127.0.0.1",
    "ack": "ack@ssl:0:privateKey={m.server}:interface=127.0.0.1",
    "upper-tls": "upper@tls:{m.sni}:port=0:interface=127.0.0.1",
    "ack-mtls": "ack@mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1",
}


@pytest.fixture(scope="module")
def server(material):
    listens = {key: spec.format(m=material) for key, spec in ENDPOINTS.items()}
    args = [a for spec in listens.values() for a in ("--listen", spec)]
    server = startServer(*args)
    server.ports = {}
    for key, spec in listens.items():
        (entry,) = [e for e in server.listening if f"{e.service}@{e.endpoint}" == spec]
        server.ports[key] = entry.port
    yield server
    server.stop()
    log = "\n".join(server.lines)
    assert "Traceback" not in log
    # A client that sends no SNI is ordinary (IP literals, s_client
    # -noservername): no warning for it.
    assert "no server certificate" not in log and "could not find domain" not in log


def sClient(
    port: int, *args: str, input: bytes = b"", servername: str | None = "localhost"
) -> subprocess.CompletedProcess:
    command = [requireTool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", *args]
    command += ["-servername", servername] if servername else ["-noservername"]
    return subprocess.run(command, input=input, capture_output=True, timeout=WAIT)


def caFor(material, key: str) -> Path:
    return material.modern.ca if key == "modern" else material.ca


def clientArgs(material, key: str) -> list[str]:
    args = ["-CAfile", str(caFor(material, key)), "-verify_return_error"]
    return args + ["-cert", str(material.client)] if "mtls" in key else args


def proxyHeader(sock: socket.socket) -> None:
    sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n")


def pythonClient(
    port: int,
    material,
    key: str,
    alpn: list[str] | None = None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(caFor(material, key)))
    if "mtls" in key:
        ctx.load_cert_chain(str(material.client))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    if key.startswith("proxy"):
        proxyHeader(sock)
    return ctx.wrap_socket(sock, server_hostname="localhost")


# -- ALPN ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ssl", "tls", "mtls", "modern"])
def test_openssl_s_client_offering_alpn_is_served_without_a_protocol(server, material, key):
    """
    Twisted's contexts answer any ALPN offer with alert 80 (internal_error);
    RFC 7301 says ignore it.
    """
    shown = sClient(
        server.ports[key], "-alpn", "h2,http/1.1", *clientArgs(material, key), input=b""
    )
    assert shown.returncode == 0, shown.stderr
    assert b"No ALPN negotiated" in shown.stdout and b"Verify return code: 0 (ok)" in shown.stdout


@pytest.mark.parametrize("key", ["ssl", "tls", "mtls", "proxy+ssl", "proxy+mtls", "modern"])
def test_python_ssl_offering_alpn_is_served_without_a_protocol(server, material, key):
    with pythonClient(server.ports[key], material, key, alpn=["h2", "http/1.1", "x-anything"]) as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"


def test_curl_with_its_alpn_offer_gets_the_ack(server, material):
    """
    curl offers h2 and http/1.1; the ack service's reply is what curl calls an
    HTTP/0.9 answer.
    """
    curl = requireTool("curl")
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--http0.9",
            "--cacert",
            str(material.ca),
            "-m",
            str(int(WAIT)),
            f"https://localhost:{server.ports['ack']}/",
            "-v",
        ],
        capture_output=True,
        timeout=WAIT,
    )
    assert result.stdout == b"I got your message", result.stderr
    assert (
        b"ALPN: server did not agree" in result.stderr
        or b"ALPN, server did not agree" in result.stderr
    )


# -- Mozilla's profiles, as sslyze judges them ------------------------------


def sslyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sslyzeCommand(), *args], capture_output=True, text=True, timeout=300)


def test_sslyze_finds_every_endpoint_compliant_with_mozilla_intermediate(server, material):
    targets = [
        f"localhost:{server.ports[key]}{{127.0.0.1}}" for key in ("ssl", "tls", "upper", "ack")
    ]
    result = sslyze("--mozilla_config=intermediate", f"--certinfo_ca_file={material.ca}", *targets)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("OK - Compliant.") == len(targets), result.stdout


def test_sslyze_finds_mtls_compliant_with_mozilla_intermediate_given_a_client_certificate(
    server, material
):
    target = f"localhost:{server.ports['mtls']}{{127.0.0.1}}"
    result = sslyze(
        "--mozilla_config=intermediate",
        f"--certinfo_ca_file={material.ca}",
        f"--cert={material.client}",
        f"--key={material.client}",
        target,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK - Compliant." in result.stdout


def test_sslyze_finds_the_modern_profile_compliant_and_tls_1_2_refused(server, material):
    target = f"localhost:{server.ports['modern']}{{127.0.0.1}}"
    result = sslyze("--mozilla_config=modern", f"--certinfo_ca_file={material.modern.ca}", target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK - Compliant." in result.stdout
    assert (
        sClient(server.ports["modern"], "-tls1_2", "-CAfile", str(material.modern.ca)).returncode
        != 0
    )


def test_sslyze_says_the_intermediate_default_is_not_modern(server, material):
    """The check can fail: the default profile keeps TLS 1.2, which modern refuses."""
    target = f"localhost:{server.ports['ssl']}{{127.0.0.1}}"
    result = sslyze("--mozilla_config=modern", f"--certinfo_ca_file={material.ca}", target)
    assert result.returncode != 0
    assert "FAILED - Not compliant." in result.stdout and "tls_versions" in result.stdout


def test_testssl_simulated_clients_all_connect_but_those_without_tls_1_2(server):
    """Before: 23 of testssl.sh's 35 simulated clients (all that offer ALPN) were refused."""
    testssl = shutil.which("testssl") or requireTool("testssl.sh")
    result = subprocess.run(
        [
            testssl,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "batch",
            "-c",
            f"127.0.0.1:{server.ports['ssl']}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [
        line for line in result.stdout.splitlines() if "TLSv1." in line or "No connection" in line
    ]
    assert len(rows) >= 30, result.stdout
    refused = sorted(line.split("  ")[0].strip() for line in rows if "No connection" in line)
    # Those offer nothing newer than TLS 1.0: Mozilla's intermediate profile leaves them out.
    assert set(refused) <= {"IE 6 XP", "IE 8 Win 7", "IE 8 XP", "Java 7u25"}, refused


# -- the details of a compliant server --------------------------------------


@pytest.mark.parametrize(
    "group, accepted",
    [("X25519", True), ("P-256", True), ("P-384", True), ("X448", False), ("P-521", False)],
)
def test_key_exchange_groups_are_mozillas(server, material, group, accepted):
    result = sClient(server.ports["ssl"], "-groups", group, "-CAfile", str(material.ca), input=b"")
    assert (result.returncode == 0) is accepted, result.stderr


def test_the_post_quantum_hybrid_is_chosen_when_offered(server, material):
    """
    X25519MLKEM768 stays first where OpenSSL has it (pyOpenSSL's OpenSSL here;
    the system's 3.0 has not).
    """
    from OpenSSL import SSL

    if "X25519MLKEM768" not in _groupsOf(SSL):
        pytest.skip("this OpenSSL has no X25519MLKEM768")
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    SSL._lib.SSL_CTX_set1_curves_list(context._context, b"X25519MLKEM768:X25519")
    context.load_verify_locations(str(material.ca))
    context.set_verify(SSL.VERIFY_PEER)
    sock = socket.create_connection(("127.0.0.1", server.ports["ssl"]), timeout=WAIT)
    connection = SSL.Connection(context, sock)
    connection.set_tlsext_host_name(b"localhost")
    connection.set_connect_state()
    while True:
        try:
            connection.do_handshake()
            break
        except SSL.WantReadError:
            assert select.select([sock], [], [], WAIT)[0], "no handshake"
    name = SSL._ffi.string(SSL._lib.SSL_get0_group_name(connection._ssl)).decode()
    connection.close()
    assert name == "X25519MLKEM768"


def _groupsOf(SSL) -> str:
    context = SSL.Context(SSL.TLS_METHOD)
    return (
        "X25519MLKEM768"
        if SSL._lib.SSL_CTX_set1_curves_list(context._context, b"X25519MLKEM768") == 1
        else ""
    )


@pytest.mark.parametrize("key", ["ssl", "tls", "mtls"])
def test_the_chain_sent_is_the_leaf_alone_never_the_root(server, material, key):
    result = sClient(server.ports[key], "-showcerts", *clientArgs(material, key), input=b"")
    assert result.returncode == 0, result.stderr
    chain = result.stdout.split(b"Certificate chain", 1)[1].split(b"\n---\n", 1)[0]
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 1, chain


def test_mtls_names_its_client_cas_in_the_certificate_request(server, material):
    result = sClient(server.ports["mtls"], *clientArgs(material, "mtls"), input=b"")
    names = result.stdout.split(b"Acceptable client certificate CA names", 1)[1].split(b"\n")[1]
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.encode() in names


@pytest.mark.parametrize(
    "asked, expected",
    [
        ("b.test", "b.test"),
        ("B.TEST", "b.test"),
        ("b.test.", "b.test"),
        ("localhost", "localhost"),
        (None, "localhost"),
        ("unknown.test", "localhost"),
    ],
)
def test_sni_chooses_the_certificate_whatever_the_case_or_a_trailing_dot(
    server, material, asked, expected
):
    cafile = material.other.ca if expected == "b.test" else material.ca
    result = sClient(server.ports["tls"], "-CAfile", str(cafile), input=b"", servername=asked)
    assert result.returncode == 0, result.stderr
    leaf = x509.load_pem_x509_certificate(result.stdout.split(b"Server certificate\n", 1)[1])
    assert expected in leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    assert b"Verify return code: 0 (ok)" in result.stdout


# -- close_notify is a half-close ---------------------------------------------


def closeNotifyThenRead(
    port: int, material, version: ssl.TLSVersion, fin: bool, message: bytes, mtls: bool = False
) -> bytes:
    """
    Python's ssl: send MESSAGE, then close_notify (and a FIN if told), and read
    what comes back until the server closes.
    """
    ctx = ssl.create_default_context(cafile=str(material.ca))
    ctx.minimum_version = ctx.maximum_version = version
    if mtls:
        ctx.load_cert_chain(str(material.client))
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

    def send() -> None:
        if outgoing.pending:
            sock.sendall(outgoing.read())

    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                send()
                incoming.write(sock.recv(65536))
        send()
        tls.write(message)
        send()
        with pytest.raises(ssl.SSLWantReadError):
            tls.unwrap()  # our close_notify is out; the server's is still to come
        send()
        if fin:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    received += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        return received


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
@pytest.mark.parametrize("fin", [False, True], ids=["close_notify", "close_notify+FIN"])
@pytest.mark.parametrize(
    "key, reply",
    [
        ("upper", b"LAST LINE\n"),
        ("upper-tls", b"LAST LINE\n"),
        ("ack", b"I got your message"),
        ("ack-mtls", b"I got your message"),
        ("ssl", b"last line"),
    ],
)
def test_close_notify_after_a_last_line_without_newline_is_answered(
    server, material, version, fin, key, reply
):
    """
    As a FIN is over TCP: upper answers the unterminated last line, ack
    acknowledges it, echo returns it.
    """
    assert (
        closeNotifyThenRead(
            server.ports[key], material, version, fin, b"last line", mtls="mtls" in key
        )
        == reply
    )


# -- the verifying client -----------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """
    A CA, and leaves it signed that the client must refuse for localhost (and
    one it must accept), each on an ssl: port.
    """
    base = tmp_path_factory.mktemp("bad")
    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    (base / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        name: str,
        cn: str,
        sans: list[x509.GeneralName] | None,
        start: int = -1,
        end: int = 30,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    ) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(caName)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=start))
            .not_valid_after(now + datetime.timedelta(days=end))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        path = base / f"{name}.pem"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(
            pem + builder.sign(caKey, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        return path

    localhost = [x509.DNSName("localhost")]
    leaves = {
        "cn-only": (
            leaf("cn-only", "localhost", None),
            "the certificate has no subjectAltName, so it is for no host name (its subject, "
            "CN=localhost, does not count); not for localhost",
        ),
        "no-san": (
            leaf("no-san", "evil.example", None),
            "the certificate has no subjectAltName, so it is for no host name (its subject, "
            "CN=evil.example, does not count); not for localhost",
        ),
        "wrong-san": (
            leaf("wrong-san", "localhost", [x509.DNSName("other.example")]),
            "the certificate is for other.example, not localhost",
        ),
        "expired": (leaf("expired", "x", localhost, -10, -1), "certificate has expired"),
        "not-yet": (
            leaf("not-yet", "x", localhost, 1, 10),
            "certificate is not yet valid or the system clock is incorrect",
        ),
        "client-only": (
            leaf("client-only", "x", localhost, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
            "unsuitable certificate purpose",
        ),
        "good": (leaf("good", "x", localhost), None),
    }
    args = [
        a
        for name, (path, _) in leaves.items()
        for a in ("--listen", f"echo@ssl:0:privateKey={path}:interface=127.0.0.1")
    ]
    process = startServer(*args)
    ports = {}
    for name, (path, _) in leaves.items():
        (entry,) = [e for e in process.listening if str(path) in e.endpoint]
        ports[name] = entry.port
    yield SimpleNamespace(ca=base / "ca.pem", leaves=leaves, ports=ports, server=process)
    process.stop()
    assert "Traceback" not in "\n".join(process.lines)


@pytest.mark.parametrize(
    "name", ["cn-only", "no-san", "wrong-san", "expired", "not-yet", "client-only"]
)
def test_the_twistsock_command_refuses_each_bad_certificate_with_status_6_and_says_why(bad, name):
    result = twistsock("echo", f"tls:localhost:{bad.ports[name]}", "--ca", str(bad.ca), "hi")
    assert result.returncode == 6, result.stderr
    assert result.stdout == b""
    assert (
        result.stderr
        == f"twistsock: tls:localhost:{bad.ports[name]}: certificate verification failed: "
        f"{bad.leaves[name][1]}\n".encode()
    )


def test_the_twistsock_command_accepts_the_good_one(bad):
    result = twistsock("echo", f"tls:localhost:{bad.ports['good']}", "--ca", str(bad.ca), "hi")
    assert result.returncode == 0 and result.stdout == b"Received: hi\n", result.stderr


@pytest.mark.parametrize("name", ["cn-only", "no-san", "wrong-san"])
def test_the_client_module_refuses_a_certificate_not_for_the_host(bad, name):
    """Through twistsock.client, in a process of its own (the reactor runs once per process)."""
    script = (
        "import sys\n"
        "from twisted.internet import task\n"
        "from twistsock import client\n"
        "def main(reactor):\n"
        f"    d = client.echo('tls:localhost:{bad.ports[name]}', b'hi', ca={str(bad.ca)!r}, "
        "reactor=reactor)\n"
        "    d.addCallbacks(lambda _: print('ACCEPTED'), lambda f: "
        "print(type(f.value).__name__, f.value.exitStatus, f.value))\n"
        "    return d\n"
        "task.react(main)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT
    )
    assert (
        result.stdout
        == f"CertificateError 6 tls:localhost:{bad.ports[name]}: certificate verification failed: "
        f"{bad.leaves[name][1]}\n"
    ), result.stderr
    assert result.stderr == ""


def test_python_ssl_agrees_with_the_client_on_the_san_less_certificate(bad):
    """An independent verifier: Python's ssl refuses the same certificate for the same reason."""
    ctx = ssl.create_default_context(cafile=str(bad.ca))
    with socket.create_connection(("127.0.0.1", bad.ports["no-san"]), timeout=WAIT) as sock:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            ctx.wrap_socket(sock, server_hostname="localhost")


def test_ssl_client_targets_are_refused_with_a_pointer_to_tls(bad):
    result = twistsock("echo", f"ssl:localhost:{bad.ports['good']}", "hi")
    assert result.returncode == 64
    assert b"ssl: targets do not check the server's certificate; use tls:HOST:PORT" in result.stderr
    assert b"Traceback" not in result.stderr


# -- the same under --workers ------------------------------------------------


def test_workers_serve_alpn_clients_and_pass_sslyze(material):
    """Workers adopt the master's socket and build their own contexts: the same profile there."""
    server = startServer(
        "--workers",
        "2",
        "--listen",
        f"ack@ssl:0:privateKey={material.server}:interface=127.0.0.1",
        "--listen",
        f"upper@mtls:0:privateKey={material.server}:clientCA={material.ca}:interface=127.0.0.1",
    )
    try:
        ack, mtls = server.service("ack").port, server.service("upper").port
        for _ in range(6):  # whichever worker accepts
            result = sClient(
                ack, "-alpn", "h2,http/1.1", *clientArgs(material, "ssl"), "-quiet", input=b"hi\n"
            )
            assert result.stdout == b"I got your message", result.stderr
        result = sslyze(
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={material.ca}",
            f"localhost:{ack}{{127.0.0.1}}",
        )
        assert result.returncode == 0 and "OK - Compliant." in result.stdout, result.stdout
        result = sslyze(
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={material.ca}",
            f"--cert={material.client}",
            f"--key={material.client}",
            f"localhost:{mtls}{{127.0.0.1}}",
        )
        assert result.returncode == 0 and "OK - Compliant." in result.stdout, result.stdout
    finally:
        server.stop()
    assert "Traceback" not in "\n".join(server.lines)


# -- a service that closes first closes the socket ----------------------------


@pytest.fixture(scope="module")
def neverIdle(material):
    """Without an idle timeout, a socket the server failed to close would stay open for ever."""
    args = ["--idle-timeout", "0"]
    for spec in (
        "upper@ssl:0:privateKey={m.server}:interface=127.0.0.1",
        "ack@tls:{m.sni}:port=0:interface=127.0.0.1",
        "upper@mtls:0:privateKey={m.server}:clientCA={m.ca}:interface=127.0.0.1",
    ):
        args += ["--listen", spec.format(m=material)]
    server = startServer(*args)
    yield server
    server.stop()
    assert "Traceback" not in "\n".join(server.lines)


@pytest.mark.parametrize(
    "service, transport", [("upper", "ssl:"), ("ack", "tls:"), ("upper", "mtls:")]
)
def test_after_the_service_closes_the_server_closes_the_socket(
    neverIdle, material, service, transport
):
    """
    Python ssl: read the reply and the server's close_notify, answer it, and
    see the server end TCP.
    """
    (entry,) = [
        e for e in neverIdle.listening if e.service == service and e.endpoint.startswith(transport)
    ]
    key = "mtls" if transport == "mtls:" else "ssl"
    with pythonClient(entry.port, material, key) as s:
        s.sendall(b"closing first\n")
        reply = b""
        while chunk := s.recv(100):  # until the server's close_notify
            reply += chunk
        assert reply in (b"CLOSING FIRST\n", b"I got your message")
        plain = s.unwrap()  # our close_notify in reply
        assert plain.recv(1) == b""  # and the server closes TCP (the socket's timeout would raise)
    closed = rf"{service} \w+ .* -> 127.0.0.1:{entry.port}: service closed after"
    before = len(neverIdle.waitFor(closed))  # the Python client's
    result = twistsock(
        service,
        f"tls:localhost:{entry.port}",
        "--ca",
        str(material.ca),
        *(["--cert", str(material.client)] if key == "mtls" else []),
        "x",
    )
    assert result.returncode == 0, result.stderr
    neverIdle.waitFor(closed, count=before + 1)


@pytest.mark.parametrize("tool", ["ncat", "socat"])
@pytest.mark.parametrize(
    "service, reply", [("upper", b"HELLO\n"), ("ack", b"I got your message"), ("echo", b"hello")]
)
def test_ncat_and_socat_with_end_of_input_after_a_last_line_without_newline(
    neverIdleAll, material, tool, service, reply
):
    """
    ncat ends with a FIN and no close_notify, socat with both: the end of input
    either way, and the socket closes.
    """
    port = neverIdleAll[service]
    if tool == "ncat":
        command = [
            requireTool("ncat"),
            "--ssl",
            "--ssl-verify",
            "--ssl-trustfile",
            str(material.ca),
            "localhost",
            str(port),
        ]
    else:
        command = [requireTool("socat"), "-", f"OPENSSL:localhost:{port},cafile={material.ca}"]
    result = subprocess.run(command, input=b"hello", capture_output=True, timeout=WAIT)
    assert (result.returncode, result.stdout) == (0, reply), result.stderr


@pytest.fixture(scope="module")
def neverIdleAll(material):
    args = ["--idle-timeout", "0"]
    for service in ("upper", "ack", "echo"):
        args += ["--listen", f"{service}@ssl:0:privateKey={material.server}:interface=127.0.0.1"]
    server = startServer(*args)
    yield {service: server.service(service).port for service in ("upper", "ack", "echo")}
    # Every exchange ended as the peer's close, not as an error, and none waits for an idle timeout
    # (there is none: a socket left open would never get its record).
    records = server.waitFor(r" tls 127\.0\.0\.1:\d+ -> ", count=6)
    server.stop()
    assert "Traceback" not in "\n".join(server.lines)
    assert len(records) == 6 and all("peer closed after" in line for line in records), records
