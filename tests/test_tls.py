"""Certificates, the mtls: parser, tls: targets and the tls:DIR guard."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import twistsock
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.testing import MemoryReactorClock

from twistsock import certs, client, tls
from twistsock.listen import parseListen

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generate_writes_a_ca_a_server_and_a_client(tmp_path):
    made = certs.generate(tmp_path / "c", ["example.test", "192.0.2.1"])
    ca, server, clientCert = load(made.ca), load(made.server), load(made.client)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    clientCert.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "example.test"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.1")
    ]
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in clientCert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert b"PRIVATE KEY" in made.server.read_bytes() and b"PRIVATE KEY" in made.client.read_bytes()
    assert b"PRIVATE KEY" not in made.ca.read_bytes(), "the CA's key is never written"
    assert stat.S_IMODE(made.server.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.client.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca.stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "ca.pem",
        "client.pem",
        "server.pem",
    ]


def test_generate_never_overwrites_without_force(tmp_path):
    first = certs.generate(tmp_path)
    before = first.server.read_bytes()
    with pytest.raises(certs.CertificatesExist, match="use --force"):
        certs.generate(tmp_path)
    assert first.server.read_bytes() == before
    certs.generate(tmp_path, force=True)
    assert first.server.read_bytes() != before


def test_certs_command(tmp_path):
    result = twistsock("certs", str(tmp_path / "d"), "--name", "example.test")
    assert result.returncode == 0, result.stderr
    assert b"localhost, 127.0.0.1, ::1, example.test" in result.stdout
    again = twistsock("certs", str(tmp_path / "d"))
    assert again.returncode == 1
    assert again.stderr.count(b"\n") == 1 and b"already exist (use --force" in again.stderr


def test_repository_never_commits_keys():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("server.pem", "ca.pem", "client.pem", "server.key", "sni/server.pem"):
        assert (
            subprocess.run(["git", "check-ignore", "-q", f"certs/{name}"], cwd=ROOT).returncode == 0
        ), name
    assert (
        subprocess.run(["git", "check-ignore", "-q", "certs/README.md"], cwd=ROOT).returncode == 1
    )
    tracked = subprocess.run(
        ["git", "ls-files", "certs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["certs/README.md"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return certs.generate(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(
    "target, expected",
    [
        ("tls:localhost:3443", ("localhost", 3443, {})),
        ("tls:127.0.0.1:3443:timeout=5", ("127.0.0.1", 3443, {"timeout": "5"})),
        ("tls:[::1]:3443", ("::1", 3443, {})),
        ("tls:[::1]:3443:bindAddress=\\:\\:1", ("::1", 3443, {"bindAddress": "::1"})),
        ("tls:\\:\\:1:3443", ("::1", 3443, {})),
        ("tls:host=localhost:port=3443", None),
        ("tls:localhost", None),
        ("tls:localhost:99999", None),
        ("tls:a:b:3443", None),
    ],
)
def test_parse_tls_target(target, expected):
    if expected is None:
        with pytest.raises(ValueError):
            tls.parseTLSTarget(target)
    else:
        assert tls.parseTLSTarget(target) == expected


def test_client_tls_endpoints_for_names_and_ipv6_literals(material):
    reactor = MemoryReactorClock()
    for target in ("tls:localhost:3443", "tls:[::1]:3443", "tls:\\:\\:1:3443"):
        assert (
            client.endpoint(target, ca=str(material.ca), cert=str(material.client), reactor=reactor)
            is not None
        )


def test_twisted_own_tls_parser_fails_on_ipv6_literals():
    """Why twistsock builds tls: client endpoints itself; delete this test when Twisted is fixed."""
    from twisted.internet.endpoints import clientFromString

    with pytest.raises(Exception, match="Codepoint"):
        clientFromString(MemoryReactorClock(), "tls:\\:\\:1:3443")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ca": "/nonexistent/ca.pem"}, "cannot read CA file"),
        ({"cert": "/nonexistent/client.pem"}, "cannot read"),
    ],
)
def test_client_tls_bad_files_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        client.endpoint("tls:localhost:3443", reactor=MemoryReactorClock(), **kwargs)


def test_ca_or_cert_without_tls_is_refused(material):
    with pytest.raises(ValueError, match="needs a tls:HOST:PORT target"):
        client.endpoint("tcp:localhost:3443", ca=str(material.ca), reactor=MemoryReactorClock())


def test_mtls_endpoint_string(material):
    assert parseListen(
        f"mtls:0:privateKey={material.server}:clientCA={material.ca}"
    ).endpoint.startswith("mtls:")
    for bad, message in [
        (f"mtls:0:privateKey={material.server}", "needs privateKey=FILE and clientCA=FILE"),
        (
            f"mtls:0:privateKey={material.server}:clientCA=/nonexistent.pem",
            "cannot read clientCA file",
        ),
        (f"mtls:0:privateKey={material.ca}:clientCA={material.ca}", "holds no private key"),
        (f"mtls:0:privateKey={material.server}:clientCA={material.ca}:nosuch=1", "bad endpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            parseListen(bad)


def test_sni_directory_with_a_ca_root_loads_and_leaves_the_root_out_of_the_chain(
    material, tmp_path
):
    """
    Twisted 26's tls: loops for ever on a root without its key; ours skips
    roots when it builds chains.
    """
    from twistsock.tls import SNIDirectory

    directory = SNIDirectory(str(material.ca.parent))
    assert directory.lookup("LOCALHOST.") is directory.default
    with pytest.raises(ValueError, match="no private key and certificate"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "ca.pem").write_bytes(material.ca.read_bytes())
        parseListen(f"tls:{empty}:port=0")
    with pytest.raises(ValueError, match="not a directory"):
        parseListen(f"proxy:tls:{tmp_path / 'missing'}:port=0")


def test_leaves_live_365_days_by_default_and_the_ca_outlives_them(tmp_path):
    made = certs.generate(tmp_path / "a")
    ca, server, clientCert = load(made.ca), load(made.server), load(made.client)
    for leaf in (server, clientCert):
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 365
        assert ca.not_valid_after_utc > leaf.not_valid_after_utc
    short = load(certs.generate(tmp_path / "b", days=90).server)
    assert (short.not_valid_after_utc - short.not_valid_before_utc).days == 90
    for days in (0, 366, 825):
        with pytest.raises(ValueError, match="--days must be from 1 to 365"):
            certs.generate(tmp_path / "c", days=days)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Example.TEST", "example.test"),
        ("example.test.", "example.test"),
        ("*.Example.test", "*.example.test"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("192.0.2.1", "192.0.2.1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("a-b.c1", "a-b.c1"),
    ],
)
def test_certificate_names_are_host_names_in_ascii(name, expected):
    assert certs.hostName(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "a b",
        "user@example.com",
        "",
        " ",
        "-a.test",
        "a-.test",
        "a..test",
        "a" * 64 + ".test",
        "*",
        "a.*.test",
        "x_y.test",
        "\x1b[31m.test",
        "fe80::1%eth0",
        "127.1",
        "0x7f.1",
        "1.2.3",
        "2130706433",
        "xn--zz",
    ],
)
def test_names_that_are_not_host_names_are_refused(name):
    with pytest.raises(
        ValueError, match="is neither a host name|cannot name an address with a scope"
    ):
        certs.hostName(name)


def test_certs_command_refuses_a_bad_name_in_one_line(tmp_path):
    result = twistsock("certs", str(tmp_path / "d"), "--name", "user@example.com")
    assert result.returncode == 64
    assert result.stderr == (
        b"twistsock certs: error: argument --name: 'user@example.com' is neither a host name "
        b"(letters, digits and hyphens in labels "
        b"between dots) nor an IP address (twistsock certs --help shows the usage)\n"
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "endpoint, message",
    [
        (
            "ssl:0:privateKey={m.server}:profile=old",
            "unknown TLS profile 'old' \\(known: intermediate, modern\\)",
        ),
        (
            "ssl:0:privateKey={m.server}:sslmethod=TLSv1_METHOD",
            "ssl: got an unexpected keyword argument 'sslmethod' \\(it takes port, privateKey",
        ),
        ("tls:{m.sni}:port=0:profile=old", "unknown TLS profile"),
        ("mtls:0:privateKey={m.server}:clientCA={m.ca}:profile=", "unknown TLS profile ''"),
        ("ssl:0:privateKey={m.client}:certKey={m.server}", "is not the key of the certificate"),
    ],
)
def test_tls_endpoint_options_are_checked_before_listening(material, endpoint, message):
    sni = Path(material.server).parent / "sni-only"
    sni.mkdir(exist_ok=True)
    (sni / "server.pem").write_bytes(material.server.read_bytes())
    from types import SimpleNamespace

    m = SimpleNamespace(server=material.server, client=material.client, ca=material.ca, sni=sni)
    with pytest.raises(ValueError, match=message):
        parseListen(endpoint.format(m=m))


def handshake(server, client) -> None:
    """Drive two memory-BIO connections until both finish the handshake (or one raises)."""
    from OpenSSL import SSL

    for _ in range(20):
        done = 0
        for connection, peer in ((client, server), (server, client)):
            try:
                connection.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            try:
                peer.bio_write(connection.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("no handshake")


@pytest.mark.parametrize("profile, tls12", [("intermediate", True), ("modern", False)])
def test_profiles_set_the_versions_and_the_suites_and_select_no_alpn(material, profile, tls12):
    from OpenSSL import SSL

    server = SSL.Connection(tls.serverContext(tls.loadIdentity(str(material.server)), profile))
    ciphers = server.get_cipher_list()
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in ciphers and not [
        c for c in ciphers if "CBC" in c or "CCM" in c or c.endswith("-SHA")
    ]
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_alpn_protos([b"h2", b"http/1.1"])
    client = SSL.Connection(context)
    client.set_connect_state()
    if tls12:
        handshake(server, client)
        assert (
            client.get_protocol_version_name() == "TLSv1.2"
            and client.get_alpn_proto_negotiated() == b""
        )
    else:
        with pytest.raises(SSL.Error, match="unsupported protocol|protocol version"):
            handshake(server, client)


def test_an_identity_chain_leaves_out_a_root(material, tmp_path):
    bundle = tmp_path / "fullchain.pem"
    bundle.write_bytes(material.server.read_bytes() + material.ca.read_bytes())
    identity = tls.loadIdentity(str(bundle))
    assert identity.chain == ()
    assert identity.names() == ["localhost"]


def test_sni_lookup_ignores_case_and_a_trailing_dot_and_knows_wildcards(tmp_path):
    from twistsock.tls import SNIDirectory

    made = certs.generate(tmp_path / "w", ["*.wild.test"])
    directory = tmp_path / "sni"
    directory.mkdir()
    (directory / "w.pem").write_bytes(made.server.read_bytes())
    sni = SNIDirectory(str(directory))
    for name in ("localhost", "LocalHost.", "a.wild.test", "A.WILD.TEST."):
        assert sni.lookup(name) is sni.default, name
    for name in ("wild.test", "a.b.wild.test", "unknown.test", ""):
        assert sni.lookup(name) is None, name


class _Handshaking:
    """What SNIDirectory's servername callback sees of an OpenSSL connection."""

    def __init__(self, name: bytes | None, context) -> None:
        self.name, self.context = name, context

    def get_servername(self):
        return self.name

    def get_context(self):
        return self.context

    def set_context(self, context) -> None:
        self.context = context


def test_sni_rereads_the_directory_for_an_unknown_name_at_most_every_5_s(tmp_path):
    from twistsock.tls import SNIDirectory

    directory = tmp_path / "sni"
    directory.mkdir()
    (directory / "a.pem").write_bytes(certs.generate(tmp_path / "a").server.read_bytes())
    now = [1000.0]
    sni = SNIDirectory(str(directory), clock=lambda: now[0])
    default = sni.default
    (directory / "b.pem").write_bytes(
        certs.generate(tmp_path / "b", ["b.test"]).server.read_bytes()
    )
    first = _Handshaking(b"B.test.", default)
    sni._select(first)
    assert first.context is not default and sni.lookup("b.test") is first.context

    (directory / "c.pem").write_bytes(
        certs.generate(tmp_path / "c", ["c.test"]).server.read_bytes()
    )
    now[0] += 4.9
    soon = _Handshaking(b"c.test", sni.default)
    sni._select(soon)
    assert sni.lookup("c.test") is None and soon.context is sni.default  # not yet reread
    now[0] += 0.2
    sni._select(soon)
    assert sni.lookup("c.test") is soon.context is not sni.default

    (directory / "d.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"
    )
    now[0] += 10
    broken = _Handshaking(b"d.test", sni.default)
    sni._select(broken)  # a broken file is logged, the old mapping kept
    assert broken.context is sni.default and sni.lookup("c.test") is not None
    nameless = _Handshaking(None, sni.default)
    sni._select(nameless)
    assert nameless.context is sni.default


def test_client_host_names_are_sent_as_a_labels_whatever_their_case():
    """
    Twisted's HostnameEndpoint refuses upper-case Unicode (IDNA 2008 without
    UTS 46) later, as a traceback.
    """
    reactor = MemoryReactorClock()
    reactor.running = True  # else names are resolved by twistsock's own endpoint
    for host in ("BÜCHER.example", "[::1]", "fe80::1%eth0"):
        assert client.endpoint((host, 1), reactor=reactor) is not None
    assert (
        client.endpoint(("BÜCHER.example", 1), reactor=reactor)._hostBytes
        == b"xn--bcher-kva.example"
    )
    with pytest.raises(ValueError, match="'2130706433' is neither a host name"):
        client.endpoint("tls:2130706433:3443", reactor=reactor)


@pytest.mark.parametrize(
    "endpoint, message",
    [
        ("tls::port=0", "tls: needs the directory of its keys and certificates first"),
        ("ssl:0:privateKey={m.server}:interface=[::1]", "a ':' inside a value is written"),
        (
            "ssl:0:privateKey={m.server}:extraCertChain={empty}",
            "certificate chain .* holds no PEM certificate",
        ),
        (
            "mtls:0:privateKey={m.server}:clientCA={m.client}",
            "holds CN=twistsock client, which is not a CA certificate",
        ),
        ("mtls:0:privateKey={m.server}:clientCA=", "mtls: clientCA= needs a file name"),
        ("ssl:0:privateKey={m.server}:certKey=", "ssl: certKey= needs a file name"),
        ("ssl:0:privateKey={m.server}:extraCertChain=", "ssl: extraCertChain= needs a file name"),
    ],
)
def test_tls_endpoint_mistakes_found_in_trials_are_one_clear_error(
    material, tmp_path, endpoint, message
):
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=message):
        parseListen(endpoint.format(m=material, empty=empty))


def test_a_chain_given_twice_is_sent_once(material, tmp_path):
    # A stand-in intermediate: any certificate that is not a root will do for
    # the chain's bookkeeping.
    intermediate = load(material.client)
    bundle = tmp_path / "fullchain.pem"
    chainFile = tmp_path / "chain.pem"
    pem = material.client.read_bytes().split(b"-----END PRIVATE KEY-----\n", 1)[1]
    bundle.write_bytes(material.server.read_bytes() + pem)
    chainFile.write_bytes(pem + material.ca.read_bytes())
    identity = tls.loadIdentity(str(bundle), extraCertChain=str(chainFile))
    assert identity.chain == (intermediate,)


def test_certs_refuses_an_empty_directory_a_directory_in_the_way_and_a_dangling_link(tmp_path):
    assert (
        twistsock("certs", "").stderr
        == b"twistsock: the directory for the certificates must not be empty\n"
    )
    (tmp_path / "file").write_text("")
    assert (
        twistsock("certs", str(tmp_path / "file")).stderr
        == f"twistsock: {tmp_path / 'file'} is not a directory\n".encode()
    )
    (tmp_path / "a" / "client.pem").mkdir(parents=True)
    result = twistsock("certs", str(tmp_path / "a"), "--force")
    assert (
        result.returncode == 1
        and result.stderr == f"twistsock: {tmp_path / 'a' / 'client.pem'} is a directory\n".encode()
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["client.pem"], (
        "nothing written, nothing left behind"
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ca.pem").symlink_to(tmp_path / "nowhere")
    assert twistsock("certs", str(tmp_path / "b")).returncode == 1
    assert (tmp_path / "b" / "ca.pem").is_symlink()


@pytest.mark.parametrize(
    "days, message",
    [
        ("-1", b"must be from 1 to 365"),
        ("366", b"must be from 1 to 365"),
        ("abc", b"'abc' is not a whole number"),
    ],
)
def test_certs_days_out_of_range_is_a_usage_error(tmp_path, days, message):
    result = twistsock("certs", str(tmp_path / "c"), "--days", days)
    assert result.returncode == 64 and message in result.stderr and result.stderr.count(b"\n") == 1
