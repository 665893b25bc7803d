"""
TLS for twistsock: certificates and contexts, the C{mtls:} server endpoint
type (a Twisted endpoint plugin, usable by any Twisted program), and client
TLS endpoints.

C{mtls:PORT:privateKey=FILE[:certKey=FILE]:clientCA=FILE[:interface=ADDR][:backlog=N]}
    TLS that refuses every client without a certificate signed by C{clientCA}.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, wrapClientTLS, wrapServerTLS
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ._direct import canWriteDirectly, writeDirectly
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


try:  # pyOpenSSL's own bindings: how many bytes a memory BIO holds (pyOpenSSL's crypto module uses it too)
    from OpenSSL.SSL import _ffi, _lib

    _memoryBIOSize = _lib.BIO_get_mem_data
    _NULL = _ffi.NULL
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _memoryBIOSize = None


#: Bytes asked of SSL_read at a time: more than a TLS record holds (16 KiB).
_READ = 2**15


def _sizeOf(connection: Any, bio: str) -> Callable[[], int]:
    """
    How to read the size of one of a memory-BIO connection's BIOs
    (C{_into_ssl}, C{_from_ssl}): a function that answers -1 (unknown) if
    pyOpenSSL's bindings do not allow it.
    """
    pointer = getattr(connection, bio, None)
    if _memoryBIOSize is None or pointer is None:
        return lambda: -1
    return partial(_memoryBIOSize, pointer, _NULL)


class DirectTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS, with replies that leave without waiting for the reactor.

    Twisted's default (C{BufferingTLSTransport}) gathers every write into a
    C{callLater(0)} and encrypts it on the next reactor pass, then hands the
    records to a transport that buffers them for one more pass: a reply costs
    two extra passes.  Here writes made while received data is being
    delivered are gathered until that delivery ends and leave then, as one
    TLS record where they fit in one; other writes are encrypted at once; and
    the records go to the socket at once when nothing waits to be sent
    (L{writeDirectly}).  pyOpenSSL reports an empty BIO or nothing left to
    decrypt by raising an exception; the BIOs' sizes are read instead where
    pyOpenSSL's bindings allow.  Everything else (handshake, producers,
    shutdown, errors) is Twisted's.
    """

    _direct = False
    _delivering = False
    _held: list[bytes]

    def makeConnection(self, transport: Any) -> None:
        self._direct = canWriteDirectly(transport)
        self._held = []
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._delivering = True
        try:
            super().dataReceived(data)
        finally:
            self._delivering = False
        if self._held:
            self._release()

    def write(self, data: bytes) -> None:
        if self.disconnecting and self._producer is None:
            return
        if data.__class__ is not bytes:
            data = memoryview(data).tobytes()  # TypeError for anything that is not a buffer
        if self._delivering:
            self._held.append(data)
        else:
            self._write(data)

    def _release(self) -> None:
        held, self._held = self._held, []
        self._write(held[0] if len(held) == 1 else b"".join(held))

    def _shutdownTLS(self) -> None:
        # close_notify goes after everything written before it.
        if self._held:
            self._release()
        super()._shutdownTLS()

    def abortConnection(self) -> None:
        # Nothing more leaves: Twisted's abort discards what its transport
        # holds, close_notify included, so that is where it must go.
        self._held = []
        self._direct = False
        super().abortConnection()

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, but it stops when nothing is left to decrypt rather
        # than asking OpenSSL once more and catching WantReadError.  Nothing
        # is left when the incoming BIO is empty and the last read did not
        # fill the buffer: with read-ahead off (OpenSSL's default, and
        # pyOpenSSL cannot turn it on) OpenSSL takes one record at a time out
        # of the BIO, and SSL_read returns what is left of the current record
        # up to the buffer's size.
        connection = self._tlsConnection
        incoming = _sizeOf(connection, "_into_ssl")
        while not self._lostTLSConnection:
            try:
                data = connection.recv(_READ)
            except WantReadError:
                break
            except ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                if len(data) < _READ and incoming() == 0:
                    break
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        outgoing = _sizeOf(connection, "_from_ssl")
        while outgoing():
            try:
                data = connection.bio_read(65536)
            except WantReadError:
                return
            if self._direct:
                writeDirectly(self.transport, data)
            else:
                self.transport.write(data)


def useDirectTLS(port: Any) -> bool:
    """
    Make the TLS factory beneath a listening port's factories (C{ssl:},
    C{tls:}, C{mtls:}, C{proxy:ssl:}, ...) build L{DirectTLSProtocol}s, if it
    builds Twisted's default ones.  True if it did.
    """
    factory = getattr(port, "factory", None)
    while factory is not None:
        if isinstance(factory, TLSMemoryBIOFactory):
            if factory.protocol is BufferingTLSTransport:
                factory.protocol = DirectTLSProtocol
                return True
            return False
        factory = getattr(factory, "wrappedFactory", None)
    return False
