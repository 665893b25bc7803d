"""
TLS for twistsock: certificates, the server contexts behind C{ssl:}, C{tls:}
and C{mtls:}, and the verifying client.

Every server context follows one of Mozilla's server-side TLS profiles
(U{https://wiki.mozilla.org/Security/Server_Side_TLS}):

    - C{intermediate} (the default): TLS 1.2 and 1.3; in TLS 1.2 only
      forward-secret AEAD suites (ECDHE with AES-GCM or ChaCha20-Poly1305).
    - C{modern}: TLS 1.3 only.

Both offer the key-exchange groups X25519MLKEM768 (where the OpenSSL in use
has it), X25519, P-256 and P-384; neither selects an ALPN protocol, so a
client that offers ALPN is served without one (RFC 7301, section 3.2).

Server endpoint strings (L{twistsock.endpoints.serverFromString}):

  - C{ssl:PORT[:privateKey=FILE][:certKey=FILE][:extraCertChain=FILE]}
    C{[:interface=ADDR][:backlog=N][:profile=NAME]}: TLS with one
    certificate: the first in C{certKey} (default: the C{privateKey} file);
    any further certificates there and in C{extraCertChain} are its chain.
  - C{tls:DIR[:port=443][:interface=ADDR][:backlog=N][:profile=NAME]}: TLS
    with SNI: every key and certificate in the C{*.pem} files under DIR,
    chosen by the name the client asks for.
  - C{mtls:PORT:privateKey=FILE[:certKey=FILE]:clientCA=FILE}
    C{[:interface=ADDR][:backlog=N][:profile=NAME]}: TLS that refuses every
    client without a certificate signed by C{clientCA} (also a Twisted
    endpoint plugin, usable by any Twisted program).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import idna
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError as NoNames
from service_identity import VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from twisted.internet import ssl
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    wrapClientTLS,
    wrapServerTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from ._format import oneLine, splitHostTarget
from .certs import hostName

#: The server profiles, by the name C{profile=} takes; the first is the default.
PROFILES = ("intermediate", "modern")
DEFAULT_PROFILE = PROFILES[0]

#: TLS 1.2 suites of Mozilla's intermediate profile that need no DH
#: parameters, in its order: ECDHE, then AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: TLS 1.3 suites (Mozilla's three; OpenSSL would also offer none other by default).
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: Key-exchange groups, preferred first.  The post-quantum hybrid is kept
#: where OpenSSL has it (3.5 and later); X448 and P-521 are left out.
GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")

# ssl.h's SSL_MODE_NO_AUTO_CHAIN, which pyOpenSSL does not name: without it
# OpenSSL completes a server's chain from the store of client CAs, root included.
_MODE_NO_AUTO_CHAIN = 0x00000008


class VerificationFailed(SSL.Error):
    """
    The peer's certificate was refused; the message says why, in one line.
    An C{SSL.Error}, so that Twisted's TLS layer ends the connection with it
    as with any other handshake failure; its arguments have the form of
    OpenSSL's error queue, which Twisted reads.
    """

    def __init__(self, why: str) -> None:
        super().__init__([("twistsock", "certificate verification", why)])
        self.why = why

    def __str__(self) -> str:
        return self.why


# -- certificates and keys ---------------------------------------------------

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_KEY = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL
)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def _loadCertificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        return [x509.load_pem_x509_certificate(block) for block in _CERTIFICATE.findall(data)]
    except ValueError:
        raise ValueError(f"{where} holds a certificate that cannot be read") from None


def _loadKey(block: bytes, where: str) -> Any:
    try:
        return serialization.load_pem_private_key(block, None)
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}: the private key cannot be read (an encrypted key is not supported)"
        ) from None


def certificates(path: str, what: str = "CA file") -> list[x509.Certificate]:
    """Every certificate in a PEM file."""
    found = _loadCertificates(_read(path, what), f"{what} {path}")
    if not found:
        raise ValueError(f"{what} {path} holds no PEM certificate")
    return found


def privateCertificate(privateKey: str, certKey: str | None = None) -> ssl.PrivateCertificate:
    """A key and its certificate, from one PEM file or two, as Twisted's type."""
    own = loadIdentity(privateKey, certKey)
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(crypto.X509.from_cryptography(own.certificate)),
        ssl.KeyPair(crypto.PKey.from_cryptography_key(own.key)),
    )


@dataclass(frozen=True)
class Identity:
    """
    A private key, its certificate, and the certificates that chain it to a
    root (never the root).
    """

    key: Any  # a cryptography private key
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    def names(self) -> list[str]:
        """The certificate's DNS names, lower case."""
        try:
            sans = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return [name.lower().rstrip(".") for name in sans.value.get_values_for_type(x509.DNSName)]


def loadIdentity(
    privateKey: str, certKey: str | None = None, extraCertChain: str | None = None
) -> Identity:
    """
    A key and its certificate from PEM files: the key from C{privateKey}; the
    certificate, then its chain, from C{certKey} (default: the same file);
    more chain from C{extraCertChain}.  Self-signed certificates (roots) are
    left out of the chain: a client must already have its root.

    @raise ValueError: a file is missing or unreadable, or the key is not the certificate's.
    """
    keyPEM = _read(privateKey, "private key")
    certPEM = _read(certKey, "certificate") if certKey else keyPEM
    found = _loadCertificates(certPEM, certKey or privateKey)
    if not found:
        raise ValueError(f"{certKey or privateKey} holds no PEM certificate")
    blocks = _KEY.findall(keyPEM)
    if not blocks:
        raise ValueError(f"{privateKey} holds no private key")
    key = _loadKey(blocks[0], privateKey)
    chain = found[1:] + (
        certificates(extraCertChain, "certificate chain") if extraCertChain else []
    )
    # Once each, and never a root: a client must already have the root.
    identity = Identity(
        key,
        found[0],
        tuple(c for c in dict.fromkeys(chain) if not _selfSigned(c) and c != found[0]),
    )
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(identity.certificate)
        context.use_privatekey(identity.key)
        context.check_privatekey()
    except SSL.Error:
        raise ValueError(
            f"the private key in {privateKey} is not the key of the certificate in "
            f"{certKey or privateKey}"
        ) from None
    return identity


def _selfSigned(certificate: x509.Certificate) -> bool:
    return certificate.subject == certificate.issuer


def _isCA(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


# -- servers ------------------------------------------------------------------


def checkProfile(profile: str) -> str:
    """The profile's name, checked."""
    if profile not in PROFILES:
        raise ValueError(f"unknown TLS profile {profile!r} (known: {', '.join(PROFILES)})")
    return profile


def _setGroups(context: SSL.Context) -> None:
    """Offer L{GROUPS}, less those this OpenSSL does not have."""
    setter = getattr(SSL._lib, "SSL_CTX_set1_curves_list", None)  # = SSL_CTX_set1_groups_list
    if setter is None:  # pragma: no cover - pyproject.toml requires a cryptography with it
        # Serving OpenSSL's default groups would silently break the profile's promise.
        raise ValueError(
            "this cryptography cannot set TLS key-exchange groups: twistsock needs "
            "cryptography 47 or later"
        )
    for start in range(len(GROUPS)):
        if setter(context._context, ":".join(GROUPS[start:]).encode()) == 1:
            return
    raise ValueError(
        "this OpenSSL offers none of the groups X25519, P-256, P-384"
    )  # pragma: no cover


def serverContext(
    identity: Identity, profile: str = DEFAULT_PROFILE, clientCAs: Sequence[x509.Certificate] = ()
) -> SSL.Context:
    """
    A server context for one certificate under one of L{PROFILES}.  With
    C{clientCAs}, a client must present a certificate signed by one of them,
    and the certificate request names them.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    modern = checkProfile(profile) == "modern"
    context.set_min_proto_version(SSL.TLS1_3_VERSION if modern else SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode())
    context.set_tls13_ciphersuites(TLS13_SUITES.encode())
    _setGroups(context)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS | _MODE_NO_AUTO_CHAIN)
    context.use_certificate(identity.certificate)
    context.use_privatekey(identity.key)
    for certificate in identity.chain:
        context.add_extra_chain_cert(certificate)
    # Sessions resumed across contexts must share this; client certificates need it.
    context.set_session_id(b"twistsock")
    # Resumption by tickets only: a server-side cache would grow with every
    # full handshake (20,480 sessions by default), as Twisted's default avoids too.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if clientCAs:
        store = context.get_cert_store()
        assert store is not None  # a new context has its store
        for ca in clientCAs:
            store.add_cert(crypto.X509.from_cryptography(ca))
            context.add_client_ca(ca)
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE
        )
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server connections, each starting with C{context}."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class SNIDirectory:
    """
    The keys and certificates of every C{*.pem} file under a directory, each
    served to the clients that ask for one of its DNS names (SNI): case and a
    trailing dot do not matter, and C{*.example.com} answers for one label.
    Clients that ask for no name, or a name no certificate has, get the first
    certificate (by file name) that names a host.  A name not found rereads
    the directory if a file changed, at most every L{RESCAN} seconds.
    """

    log = Logger()
    #: Seconds between two rereadings of the directory.
    RESCAN = 5.0

    def __init__(
        self,
        directory: str,
        profile: str = DEFAULT_PROFILE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.profile = checkProfile(profile)
        self._clock = clock
        if not self.directory.is_dir():
            raise ValueError(f"{directory} is not a directory of PEM files")
        self._signature: object = None
        self._scanned = 0.0
        self._contexts: dict[str, SSL.Context] = {}
        self._load()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*.pem") if p.is_file())

    def _signatureNow(self) -> object:
        return [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in self._files()]

    def _load(self) -> None:
        signature = self._signatureNow()
        keys: list[tuple[Path, Any]] = []
        certs: list[x509.Certificate] = []
        for path in self._files():
            data = _read(str(path), "PEM file")
            certs += _loadCertificates(data, str(path))
            keys += [(path, _loadKey(block, str(path))) for block in _KEY.findall(data)]
        bySubject = {c.subject: c for c in certs if not _selfSigned(c)}
        contexts: dict[str, SSL.Context] = {}
        first: SSL.Context | None = None
        named: SSL.Context | None = None
        for path, key in keys:
            leaf = next(
                (c for c in certs if _publicKey(c.public_key()) == _publicKey(key.public_key())),
                None,
            )
            if leaf is None:
                raise ValueError(f"{path}: no certificate in {self.directory} for this private key")
            chain, issuer = [], bySubject.get(leaf.issuer)
            while issuer is not None and issuer not in chain and issuer != leaf:
                chain.append(issuer)
                issuer = bySubject.get(issuer.issuer)
            identity = Identity(key, leaf, tuple(chain))
            context = serverContext(identity, self.profile)
            first = first or context
            names = identity.names()
            named = named or (context if names else None)
            for name in names:
                contexts.setdefault(name, context)
        default = named or first
        if default is None:
            raise ValueError(
                f"no private key and certificate in the *.pem files of {self.directory}"
            )
        default.set_tlsext_servername_callback(self._select)
        self._contexts, self.default, self._signature = contexts, default, signature

    def lookup(self, name: str) -> SSL.Context | None:
        """The context for a server name, or None."""
        name = name.lower().rstrip(".")
        found = self._contexts.get(name)
        if found is None and "." in name:
            found = self._contexts.get("*." + name.split(".", 1)[1])
        return found

    def _select(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return
        name = raw.decode("ascii", "replace")
        context = self.lookup(name)
        if context is None and self._clock() - self._scanned >= self.RESCAN:
            self._scanned = self._clock()
            try:
                if self._signatureNow() != self._signature:
                    self._load()
                    self.log.info(
                        "reread {directory}: {count} names",
                        directory=str(self.directory),
                        count=len(self._contexts),
                    )
            except (OSError, ValueError) as e:
                self.log.warn(
                    "cannot reread {directory}: {error}",
                    directory=str(self.directory),
                    error=oneLine(str(e)),
                )
            context = self.lookup(name)
        if context is not None and context is not connection.get_context():
            connection.set_context(context)

    def creator(self) -> SNIServerTLS:
        return SNIServerTLS(self)


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerTLS:
    """Server connections that start with the directory's first certificate and switch by SNI."""

    def __init__(self, directory: SNIDirectory) -> None:
        self.directory = directory

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        return SSL.Connection(self.directory.default, None)


def _publicKey(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tcpServer(reactor: Any, port: str, interface: str, backlog: str) -> IStreamServerEndpoint:
    endpoint = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
    return endpoint(reactor, int(port), int(backlog), interface)


def sslServer(
    reactor: Any,
    port: str,
    privateKey: str = "server.pem",
    certKey: str | None = None,
    extraCertChain: str | None = None,
    interface: str = "",
    backlog: str = "50",
    profile: str = DEFAULT_PROFILE,
) -> IStreamServerEndpoint:
    """C{ssl:PORT[:privateKey=FILE][:certKey=FILE][:extraCertChain=FILE][:interface=ADDR][:backlog=N][:profile=NAME]}."""
    context = serverContext(loadIdentity(privateKey, certKey, extraCertChain), profile)
    return wrapServerTLS(ServerTLS(context), _tcpServer(reactor, port, interface, backlog))


def sniServer(
    reactor: Any,
    path: str = "",
    port: str = "443",
    backlog: str = "50",
    interface: str = "::",
    profile: str = DEFAULT_PROFILE,
) -> IStreamServerEndpoint:
    """C{tls:DIR[:port=443][:interface=ADDR][:backlog=N][:profile=NAME]}; binds C{::} by default."""
    if not path:
        raise ValueError(
            "tls: needs the directory of its keys and certificates first: tls:DIR[:port=443]"
        )
    return wrapServerTLS(
        SNIDirectory(path, profile).creator(), _tcpServer(reactor, port, interface, backlog)
    )


def mtlsServer(
    reactor: Any,
    port: str,
    privateKey: str | None = None,
    clientCA: str | None = None,
    certKey: str | None = None,
    interface: str = "",
    backlog: str = "50",
    profile: str = DEFAULT_PROFILE,
    extraCertChain: str | None = None,
) -> IStreamServerEndpoint:
    """C{mtls:PORT:privateKey=FILE[:certKey=FILE]:clientCA=FILE[:interface=ADDR][:backlog=N][:profile=NAME]}."""
    if privateKey is None or clientCA is None:
        raise ValueError("mtls: needs privateKey=FILE and clientCA=FILE")
    cas = certificates(clientCA, "clientCA file")
    for ca in cas:
        if not _selfSigned(ca) and not _isCA(ca):
            raise ValueError(
                f"clientCA file {clientCA} holds {_subject(ca)}, which is not a CA "
                "certificate: clientCA names the CA that signed the clients' certificates"
            )
    context = serverContext(loadIdentity(privateKey, certKey, extraCertChain), profile, cas)
    return wrapServerTLS(ServerTLS(context), _tcpServer(reactor, port, interface, backlog))


#: twistsock's TLS server endpoint types, by prefix.
SERVERS: dict[str, Callable[..., IStreamServerEndpoint]] = {
    "ssl": sslServer,
    "tls": sniServer,
    "mtls": mtlsServer,
}


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """C{mtls:}, for every Twisted program."""

    prefix = "mtls"

    # The pieces are strings; Any, as in Twisted's own tls: parser, because
    # the interface types them as objects.
    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        return mtlsServer(reactor, *args, **kwargs)


# -- clients ------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """
    Client connections that verify the server: its chain against C{trust}
    (else the platform's trust store), then that it is for C{host}, by the
    certificate's subjectAltName alone (service-identity; a common name is
    never taken for a host name).  Any failure fails the handshake with
    L{VerificationFailed}, which says why.
    """

    def __init__(
        self,
        host: str,
        trust: Iterable[x509.Certificate] | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.host = host
        self._id: ServiceID
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                self._sni: bytes | None = idna.encode(host, uts46=True)
            except idna.IDNAError:
                raise ValueError(f"{host!r} is not a host name") from None
            self._id = DNS_ID(self._sni.decode("ascii"))
        else:
            self._sni = None  # RFC 6066: no SNI for an address
            self._id = IPAddress_ID(host)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        if trust is None:
            context.set_default_verify_paths()
        else:
            store = context.get_cert_store()
            assert store is not None  # a new context has its store
            for certificate in trust:
                store.add_cert(crypto.X509.from_cryptography(certificate))
        if identity is not None:
            context.use_certificate(identity.certificate)
            context.use_privatekey(identity.key)
            for certificate in identity.chain:
                context.add_extra_chain_cert(certificate)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        self.context = context

    def clientConnectionForTLS(self, protocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        _expectHost(connection, self.host, self._sni)
        return connection

    def _verify(
        self, connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        # Raising makes OpenSSL refuse the certificate (and send its alert);
        # pyOpenSSL raises the exception again from the handshake.
        why: str | None
        try:
            if not ok and error in _NAME_MISMATCH:
                why = self._nameMismatch(certificate) or verifyErrorText(error)
            elif not ok:
                why = verifyErrorText(error)
                if error in _UNTRUSTED:
                    why += " (not signed by a trusted CA; --ca FILE names the CA to trust)"
                if depth:
                    why += f" (certificate {depth} of the chain: {_subject(certificate)})"
            elif depth:
                return True
            else:
                why = self._nameMismatch(certificate)
                if why is None:
                    return True
        except Exception as e:
            why = f"cannot check the certificate: {oneLine(str(e))}"
        raise VerificationFailed(why)

    def _nameMismatch(self, certificate: crypto.X509) -> str | None:
        """Why the certificate is not for C{host}, or None if it is."""
        host = self.host
        try:
            verify_service_identity(extract_patterns(certificate.to_cryptography()), [self._id], [])
        except NoNames:
            return (
                "the certificate has no subjectAltName, so it is for no host name (its subject, "
                f"{_subject(certificate)}, does not count); not for {host}"
            )
        except VerificationError:
            names = _sanNames(certificate)
            return (
                "the certificate is for "
                f"{', '.join(names[:8]) + (', ...' if len(names) > 8 else '')}, not {host}"
            )
        return None


def _expectHost(connection: SSL.Connection, host: str, asciiName: bytes | None) -> None:
    """
    Have OpenSSL check the name too, by subjectAltName only, so that a
    mismatch fails like any other verification error and the server is told
    with a C{bad certificate} alert.  service-identity checks it again.
    """
    lib = SSL._lib
    if not hasattr(lib, "SSL_get0_param"):  # pragma: no cover - service-identity alone then
        return
    param = lib.SSL_get0_param(connection._ssl)
    lib.X509_VERIFY_PARAM_set_hostflags(param, lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT)
    if asciiName is not None:
        lib.X509_VERIFY_PARAM_set1_host(param, asciiName, len(asciiName))
    else:
        packed = ipaddress.ip_address(host).packed
        lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))


# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = {62, 64}
# X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, _DEPTH_ZERO_SELF_SIGNED_CERT,
# _SELF_SIGNED_CERT_IN_CHAIN, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY
_UNTRUSTED = {2, 18, 19, 20}


def verifyErrorText(error: int) -> str:
    """OpenSSL's text for a certificate verification error number (C{certificate has expired})."""
    return SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(error)).decode("ascii", "replace")


def _subject(certificate: crypto.X509 | x509.Certificate) -> str:
    if isinstance(certificate, crypto.X509):
        certificate = certificate.to_cryptography()
    return oneLine(certificate.subject.rfc4514_string()) or "empty subject"


def _sanNames(certificate: crypto.X509) -> list[str]:
    try:
        sans = (
            certificate.to_cryptography()
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [oneLine(n) for n in sans.get_values_for_type(x509.DNSName)] + [
        str(a) for a in sans.get_values_for_type(x509.IPAddress)
    ]


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
    family: int = 0,
) -> IStreamClientEndpoint:
    """
    A TLS client endpoint that verifies the server's certificate and name:
    against the CA certificates in C{ca} (a PEM file, or a directory of them),
    else the platform's trust store.  C{cert} is a PEM file with a client
    certificate and, unless C{privateKey} names another file, its key.
    C{host} may be a name or an IPv4 or IPv6 literal.
    """
    host = hostName(host, wildcard=False, scoped=True)
    trust = _trusted(ca) if ca else None
    identity = loadIdentity(privateKey or cert, cert) if cert else None
    from .client import (
        streamEndpoint,
    )  # the client module's choice: no resolution for literals, none needing a running reactor

    tcp = streamEndpoint(reactor, host, int(port), timeout, bindAddress, family)
    return wrapClientTLS(ClientTLS(host, trust, identity), tcp)


def _trusted(ca: str) -> list[x509.Certificate]:
    """The certificates of a PEM file, or of every *.pem in a directory (Twisted's trustRoots=)."""
    path = Path(ca)
    if path.is_dir():
        found = [
            c
            for pem in sorted(path.glob("*.pem"))
            if b"CERTIFICATE-----" in pem.read_bytes()
            for c in certificates(str(pem))
        ]
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
