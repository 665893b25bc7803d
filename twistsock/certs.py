"""
Local TLS material for twistsock: a private CA, a server certificate and a
client certificate, generated with C{cryptography}.

The CA's private key is used once, to sign the two certificates, and never
written to disk: nobody can mint more certificates that the CA vouches for.
Making new ones (renewing them) means making a new CA (C{--force}).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import idna
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names every server certificate carries.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
CLIENT_NAME = "twistsock client"
#: How long the server and client certificates are valid, in days, unless
#: told otherwise: under Mozilla's intermediate limit (less than 366) and
#: Apple's (398).  Mozilla's modern profile wants 90 or fewer.
VALID_DAYS = 365
#: The most a leaf may be given.
MAX_DAYS = 365
#: How long the CA is valid: longer than any leaf it signs.
CA_DAYS = 10 * 365

FILES = ("ca.pem", "server.pem", "client.pem")


@dataclass(frozen=True)
class Generated:
    """What L{generate} wrote."""

    ca: Path
    server: Path
    client: Path
    names: tuple[str, ...]


class CertificatesExist(Exception):
    """Some of the files exist and C{force} was not given."""


def generate(
    directory: Path | str, names: Iterable[str] = (), *, force: bool = False, days: int = VALID_DAYS
) -> Generated:
    """
    Write C{ca.pem}, C{server.pem} (key and certificate, for C{DEFAULT_NAMES}
    and C{names}) and C{client.pem} (key and certificate) into C{directory}.
    The server and client certificates are valid for C{days} days, the CA
    for L{CA_DAYS}.  Files holding keys are mode 0600.

    @raise CertificatesExist: a file exists and C{force} is false.
    @raise ValueError: a name that is neither a host name nor an IP address,
        or C{days} out of range.
    """
    if not str(directory).strip():
        raise ValueError("the directory for the certificates must not be empty")
    directory = Path(directory)
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(
            f"--days must be from 1 to {MAX_DAYS} (Mozilla's intermediate profile allows less "
            "than 366)"
        )
    allNames = tuple(dict.fromkeys([*DEFAULT_NAMES, *(hostName(n) for n in names)]))
    paths = [directory / name for name in FILES]
    existing = [str(p) for p in paths if os.path.lexists(p)]  # a dangling link too
    if existing and not force:
        raise CertificatesExist(
            f"{', '.join(existing)} already exist (use --force to replace them)"
        )
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{path} is a directory")

    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"twistsock local CA {now:%Y-%m-%d %H:%M:%S}")]
    )
    ca = (
        _builder(caName, caName, caKey.public_key(), now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(certSign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), critical=False
        )
        .sign(caKey, hashes.SHA256())
    )

    def leaf(commonName: str, purpose: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
        builder = (
            _builder(subject, ca.subject, key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(certSign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(caKey, hashes.SHA256())

    server = leaf(allNames[0], ExtendedKeyUsageOID.SERVER_AUTH, [_generalName(n) for n in allNames])
    client = leaf(CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    _writeAll(
        {
            paths[0]: (_pem(ca), 0o644),
            paths[1]: (_keyPem(server[0]) + _pem(server[1]), 0o600),
            paths[2]: (_keyPem(client[0]) + _pem(client[1]), 0o600),
        }
    )
    return Generated(paths[0], paths[1], paths[2], names=allNames)


def _builder(
    subject: x509.Name, issuer: x509.Name, key, now: datetime.datetime, days: int
) -> x509.CertificateBuilder:
    # Five minutes back for clocks a little behind; the life span is still exactly `days`.
    start = now - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def hostName(name: str, *, wildcard: bool = True, scoped: bool = False) -> str:
    """
    A name as a certificate carries it: an IP address, or a DNS name in lower
    case with Unicode labels as IDNA A-labels (C{Bücher.example} is
    C{xn--bcher-kva.example}); C{*.} may stand first if C{wildcard}.  An IPv6
    address may have a scope (C{%eth0}) only if C{scoped}: a certificate
    cannot carry one.

    @raise ValueError: neither; or a name whose last label is a number
        (C{127.1}, C{2130706433}): such names are read as IPv4 addresses.
    """
    text = name.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id and not scoped:
            raise ValueError(
                f"{name!r}: a certificate cannot name an address with a scope (%{address.scope_id})"
            )
        return str(address)
    refused = ValueError(
        f"{name!r} is neither a host name (letters, digits and hyphens in labels between "
        "dots) nor an IP address"
    )
    labels = text.rstrip(".").split(".")
    star = wildcard and labels[0] == "*" and len(labels) > 1
    out = ["*"] if star else []
    for label in labels[1:] if star else labels:
        try:
            label = (
                label.lower() if label.isascii() else idna.encode(label, uts46=True).decode("ascii")
            )
            if label.startswith("xn--"):
                idna.decode(label)  # an A-label must decode
        except (idna.IDNAError, UnicodeError):
            raise refused from None
        if not _LABEL.match(label):
            raise refused
        out.append(label)
    if out[-1].isdigit() or len(".".join(out)) > 253:
        raise refused
    return ".".join(out)


def _usage(certSign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not certSign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certSign,
        crl_sign=certSign,
        encipher_only=False,
        decipher_only=False,
    )


def _generalName(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _keyPem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _writeAll(files: dict[Path, tuple[bytes, int]]) -> None:
    """
    Write every file under a temporary name with its mode from the start,
    then move them all into place: a failure while writing leaves the old
    files as they were.
    """
    temporaries: dict[Path, Path] = {}
    try:
        for path, (data, mode) in files.items():
            temporary = temporaries[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(temporary, mode)  # the umask may have narrowed it
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {e.filename}: {e.strerror}") from None
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
