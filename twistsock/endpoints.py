"""
Server endpoint strings as twistsock reads them: Twisted's, except that
C{ssl:}, C{tls:} and C{mtls:} are twistsock's TLS (L{twistsock.tls}), with
Mozilla's profiles and no ALPN trouble, wherever they stand (C{proxy:ssl:...},
Twisted's C{haproxy:ssl:...}, under C{--workers} too), and C{unix:} with a lock
reclaims a stale one by whether the socket answers (L{twistsock._unixlock}).
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint

from ._unixlock import ReclaimingUNIXEndpoint
from .tls import SERVERS


def serverFromString(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    Build a server endpoint from its string.

    @raise ValueError: a twistsock TLS endpoint with bad or unknown arguments.
    """
    kind, _, rest = description.partition(":")
    if kind == "haproxy" and rest:
        # Twisted's own PROXY wrapper, around our endpoint (haproxy:ssl:...).
        return proxyEndpoint(serverFromString(reactor, rest))
    build = SERVERS.get(kind)
    if build is None:
        endpoint = endpoints.serverFromString(reactor, description)
        if isinstance(endpoint, endpoints.UNIXServerEndpoint):
            return ReclaimingUNIXEndpoint(endpoint)
        return endpoint
    args, kwargs = parseArguments(rest)
    if len(args) > 1:
        raise ValueError(
            f"{kind}: a ':' inside a value is written '\\:' (interface=\\:\\:1), so "
            f"{':'.join(args[1:])!r} is not a key=value"
        )
    empty = [key for key, value in kwargs.items() if not value and key in _FILES]
    if empty:
        raise ValueError(f"{kind}: {empty[0]}= needs a file name")
    try:
        inspect.signature(build).bind(reactor, *args, **kwargs)
    except TypeError as e:
        known = [name for name in inspect.signature(build).parameters if name != "reactor"]
        raise ValueError(f"{kind}: {e} (it takes {', '.join(known)})") from None
    return build(reactor, *args, **kwargs)


#: The options that name files.
_FILES = ("privateKey", "certKey", "extraCertChain", "clientCA")


def parseArguments(text: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint's arguments as Twisted does: at colons, each
    C{key=value} a keyword; a backslash escapes the next character.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    if not text:
        return args, kwargs
    key, current, chars = None, [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == "=" and key is None:
            key, current = "".join(current), []
        elif char == ":":
            _add(args, kwargs, key, "".join(current))
            key, current = None, []
        else:
            current.append(char)
    _add(args, kwargs, key, "".join(current))
    return args, kwargs


def _add(args: list[str], kwargs: dict[str, str], key: str | None, value: str) -> None:
    if key is None:
        args.append(value)
    else:
        kwargs[key] = value
