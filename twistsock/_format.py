"""Render addresses and untrusted bytes as safe, single-line text for logs and output."""

from __future__ import annotations

import ipaddress

from OpenSSL import SSL
from twisted.internet import error as _error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

# One table escapes, in a single pass: control characters (C0, DEL, C1) and
# Unicode line breaks, so that bytes from the network can never forge or split
# a log line; the backslash itself; and undecodable bytes, which the
# "surrogateescape" decoding turns into U+DC80..U+DCFF.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord("\\"): "\\\\"})
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# Invisible format characters that reorder or hide text (bidi overrides, zero widths, the BOM).
_ESCAPES.update(
    {
        c: f"\\u{c:04x}"
        for c in [
            0x00AD,
            0x061C,
            0x180E,
            *range(0x200B, 0x2010),
            *range(0x202A, 0x202F),
            *range(0x2060, 0x2070),
            0xFEFF,
            *range(0xFFF9, 0xFFFC),
        ]
    }
)
_ESCAPES.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})

#: How many bytes of one message a log line shows.
LOG_LIMIT = 1024


def printable(data: bytes, limit: int = LOG_LIMIT) -> str:
    """
    Return C{data} as one line of text: UTF-8 where it decodes, backslash
    escapes elsewhere, at most C{limit} bytes shown.
    """
    text = data[:limit].decode("utf-8", "surrogateescape").translate(_ESCAPES)
    if len(data) > limit:
        text += f"... [{len(data) - limit} more bytes]"
    return text


def host(address: str) -> str:
    """Return an IP address as text, IPv4-mapped IPv6 addresses as plain IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address[len("::ffff:") :]
    return address


def describe(address: object) -> str:
    """
    Return a Twisted address as C{HOST:PORT}, C{[HOST6]:PORT} or C{unix:PATH}.
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        plain = host(address.host)
        if plain != address.host:
            return f"{plain}:{address.port}"
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            # A path from a PROXY v2 header is any 108 bytes: escaped, never raw.
            return f"unix:{printable(name, 108)}" if name else "unix:(unnamed)"
        return f"unix:{oneLine(name)}" if name else "unix:(unnamed)"
    return str(address)


def isIPv6Literal(text: str) -> bool:
    """Return whether C{text} is an IPv6 address literal such as C{::1}."""
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def oneLine(text: str) -> str:
    """C{text} with newlines and other control characters escaped, so that it stays one line."""
    if text.isprintable() and not any(ord(c) in _ESCAPES for c in text if ord(c) > 0x7E):
        return text
    return "".join(
        c if c.isprintable() and ord(c) not in _ESCAPES else _ESCAPES.get(ord(c)) or repr(c)[1:-1]
        for c in text
    )


def errorText(e: BaseException | None) -> str:
    """
    The part of a connection error a user needs, as one line: OpenSSL's
    reason strings (C{unsupported protocol}), the OS error text of Twisted's
    connection errors (C{Connection refused}), else the message.  C{e} is
    usually a L{twisted.python.failure.Failure}'s C{value}, which Twisted types as optional.
    """
    return oneLine(_errorText(e))


def _errorText(e: BaseException | None) -> str:
    if isinstance(e, _error.CannotListenError) and e.socketError is not None:
        return _errorText(e.socketError)
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [entry[-1] for entry in e.args[0] if isinstance(entry, tuple) and entry[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    if (
        isinstance(e, (_error.ConnectError, _error.ConnectionLost))
        and e.args
        and isinstance(e.args[0], str)
    ):
        # getConnectError() and the transports put the OS error text here.
        text = e.args[0].strip().rstrip(".")
        if text:
            return text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().rstrip(".") or type(e).__name__


def splitEndpoint(text: str) -> list[str]:
    """Split an endpoint string at unescaped colons and undo the escapes, as Twisted does."""
    fields, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def splitHostTarget(target: str) -> tuple[str, str, int, dict[str, str]]:
    """
    Split C{SCHEME:HOST:PORT[:key=value...]}; HOST may be C{[::1]} or an
    escaped IPv6 literal (C{\\:\\:1}).

    @raise ValueError: not of that form.
    """
    scheme, _, rest = target.partition(":")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise ValueError(f"a target is {scheme}:HOST:PORT")
        host, fields = rest[1:end], splitEndpoint(rest[end + 2 :])
    else:
        fields = splitEndpoint(rest)
        if len(fields) < 2 or "=" in fields[0]:
            raise ValueError(f"a target is {scheme}:HOST:PORT")
        host, fields = fields[0], fields[1:]
    port, options = fields[0], {}
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            raise ValueError(f"unexpected {field!r} in {target!r}")
        options[key] = value
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r} in {target!r}")
    if not host or (":" in host and not isIPv6Literal(host)):
        raise ValueError(f"bad host {host!r} in {target!r}")
    return scheme, host, int(port), options
