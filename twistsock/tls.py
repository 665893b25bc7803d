"""
TLS for twistsock: certificates and contexts, the C{mtls:} server endpoint
type (a Twisted endpoint plugin, usable by any Twisted program), and client
TLS endpoints.

C{mtls:PORT:privateKey=FILE[:certKey=FILE]:clientCA=FILE[:interface=ADDR][:backlog=N]}
    TLS that refuses every client without a certificate signed by C{clientCA}.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, wrapClientTLS, wrapServerTLS
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

from ._format import splitHostTarget


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def certificates(path: str, what: str = "CA file") -> list[ssl.Certificate]:
    """Every certificate in a PEM file."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", _read(path, what), re.DOTALL)
    if not blocks:
        raise ValueError(f"{what} {path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def privateCertificate(privateKey: str, certKey: str | None = None) -> ssl.PrivateCertificate:
    """A key and its certificate, from one PEM file or two."""
    keyPEM = _read(privateKey, "private key")
    certPEM = _read(certKey, "certificate") if certKey else keyPEM
    if b"CERTIFICATE-----" not in certPEM:
        raise ValueError(f"{certKey or privateKey} holds no certificate (give certKey=FILE)")
    if b"PRIVATE KEY-----" not in keyPEM:
        raise ValueError(f"{privateKey} holds no private key")
    try:
        return ssl.PrivateCertificate.loadPEM(certPEM + b"\n" + keyPEM)
    except Exception as e:  # pyOpenSSL raises several kinds for bad PEM
        raise ValueError(f"cannot load the key and certificate from {privateKey}: {e}") from None


#: TLS 1.2 cipher suites of mtls: forward secret and authenticated encryption
#: only (TLS 1.3's suites are all both).
STRICT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def mutualTLSOptions(privateKey: str, clientCA: str, certKey: str | None = None) -> ssl.CertificateOptions:
    """Server options that require a client certificate signed by C{clientCA}; TLS 1.2 at least."""
    own = privateCertificate(privateKey, certKey)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        verify=True,
        requireCertificate=True,
        caCerts=[c.original for c in certificates(clientCA, "clientCA file")],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(STRICT_CIPHERS),
    )


def checkSNIDirectory(directory: str) -> None:
    """
    Refuse a C{tls:DIR} directory that Twisted 26 cannot load.

    Twisted's C{tls:} endpoint follows each certificate's issuer among the
    certificates in DIR that have no key, and never stops at a self-signed
    one: a CA root such as C{certs/ca.pem} beside the server's key hangs it
    for ever while parsing.  Roots never belong in a server's chain anyway.

    @raise ValueError: DIR is missing, or holds such a certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{directory} is not a directory of PEM files")
    keys, roots = set(), []
    for pem in sorted(path.rglob("*.pem")):
        data = pem.read_bytes()
        for block in re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", data, re.DOTALL):
            try:
                public = serialization.load_pem_private_key(block, None).public_key()
            except (ValueError, TypeError):
                continue
            keys.add(public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.DOTALL):
            try:
                certificate = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue
            if certificate.issuer == certificate.subject:
                roots.append((pem, certificate))
    for pem, certificate in roots:
        spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if spki not in keys:
            raise ValueError(
                f"{pem} is a self-signed (CA root) certificate without its key: Twisted's tls: endpoint "
                f"never finishes loading such a directory; keep only the server's key, certificate and "
                f"intermediates in {directory}"
            )


def _tcpServer(reactor: Any, port: str, interface: str, backlog: str) -> IStreamServerEndpoint:
    endpoint = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
    return endpoint(reactor, int(port), int(backlog), interface)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """C{mtls:PORT:privateKey=FILE[:certKey=FILE]:clientCA=FILE[:interface=ADDR][:backlog=N]}."""

    prefix = "mtls"

    def parseStreamServer(
        self,
        reactor: Any,
        port: str,
        privateKey: str | None = None,
        clientCA: str | None = None,
        certKey: str | None = None,
        interface: str = "",
        backlog: str = "50",
    ) -> IStreamServerEndpoint:
        if privateKey is None or clientCA is None:
            raise ValueError("mtls: needs privateKey=FILE and clientCA=FILE")
        options = mutualTLSOptions(privateKey, clientCA, certKey)
        return wrapServerTLS(options, _tcpServer(reactor, port, interface, backlog))


def clientEndpoint(
    reactor: Any,
    host: str,
    port: int,
    *,
    ca: str | None = None,
    cert: str | None = None,
    privateKey: str | None = None,
    timeout: float = 30,
    bindAddress: str | None = None,
) -> IStreamClientEndpoint:
    """
    A TLS client endpoint that verifies the server's certificate and name:
    against the CA certificates in C{ca} (a PEM file, or a directory of them),
    else the platform's trust store.  C{cert} is a PEM file with a client
    certificate and, unless C{privateKey} names another file, its key.
    C{host} may be a name or an IPv4 or IPv6 literal.
    """
    trust = ssl.trustRootFromCertificates(_trusted(ca)) if ca else ssl.platformTrust()
    options = ssl.optionsForClientTLS(
        host,
        trustRoot=trust,
        clientCertificate=privateCertificate(privateKey or cert, cert) if cert else None,
    )
    tcp = HostnameEndpoint(reactor, host, int(port), timeout=timeout, bindAddress=(bindAddress, 0) if bindAddress else None)
    return wrapClientTLS(options, tcp)


def _trusted(ca: str) -> list[ssl.Certificate]:
    """The certificates of a PEM file, or of every *.pem in a directory (Twisted's trustRoots=)."""
    path = Path(ca)
    if path.is_dir():
        found = [c for pem in sorted(path.glob("*.pem")) if b"CERTIFICATE-----" in pem.read_bytes() for c in certificates(str(pem))]
        if not found:
            raise ValueError(f"no *.pem certificates in {ca}")
        return found
    return certificates(ca)


def parseTLSTarget(target: str) -> tuple[str, int, dict[str, str]]:
    """
    Split C{tls:HOST:PORT[:key=value...]}; HOST may be C{[::1]} or an escaped
    IPv6 literal (C{\\:\\:1}).  Twisted's own C{tls:} parser fails on IPv6
    literals (it passes them to IDNA).
    """
    _, host, port, options = splitHostTarget(target)
    return host, port, options
