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
            name = name.decode("utf-8", "backslashreplace")
        return f"unix:{name}" if name else "unix:(unnamed)"
    return str(address)


def isIPv6Literal(text: str) -> bool:
    """Return whether C{text} is an IPv6 address literal such as C{::1}."""
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def errorText(e: BaseException) -> str:
    """
    The part of a connection error a user needs, as one line: OpenSSL's
    reason strings (C{unsupported protocol}), the OS error text of Twisted's
    connection errors (C{Connection refused}), else the message.
    """
    if isinstance(e, _error.CannotListenError) and e.socketError is not None:
        return errorText(e.socketError)
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [entry[-1] for entry in e.args[0] if isinstance(entry, tuple) and entry[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    if isinstance(e, (_error.ConnectError, _error.ConnectionLost)) and e.args and isinstance(e.args[0], str):
        # getConnectError() and the transports put the OS error text here.
        text = e.args[0].strip().rstrip(".")
        if text:
            return text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().rstrip(".") or type(e).__name__
