"""
C{twist sockets}: options in, a tree of listening services out.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from .listen import ListenSpec, SocketsService, listeningService, parseListen
from .connection import DEFAULT_HANDSHAKE_TIMEOUT
from .services import DEFAULT_MAX_LINE, ServiceConfig

DEFAULT_LISTEN = "echo@tcp:5000"


class Options(usage.Options):
    """The options of C{twist sockets}."""

    synopsis = "[--listen [SERVICE@]ENDPOINT ...] [options]"
    longdesc = (
        "Serve the classic socket services on Twisted endpoints. SERVICE is one of "
        "echo, upper, sink, ack (default echo); ENDPOINT is any Twisted server "
        "endpoint string: tcp:5000, tcp6:5000, unix:/tmp/echo.sock, ssl:..., tls:DIR, "
        "mtls:..., proxy:ENDPOINT, systemd:... "
        f"With no --listen: {DEFAULT_LISTEN}."
    )
    optFlags = [
        ["keep-open", None, "upper: answer every line until the client closes (default: one line per connection)."],
    ]
    optParameters = [
        ["max-line", None, DEFAULT_MAX_LINE, "upper, ack: longest line accepted, in bytes.", int],
        ["tls-handshake-timeout", None, DEFAULT_HANDSHAKE_TIMEOUT, "Seconds a TLS client has to finish its handshake.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"]: list[ListenSpec] = []

    def opt_listen(self, text: str) -> None:
        """[SERVICE@]ENDPOINT to serve; repeatable."""
        try:
            self["listen"].append(parseListen(text))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if self["max-line"] < 1:
            raise usage.UsageError("--max-line must be at least 1")
        if not self["tls-handshake-timeout"] > 0:
            raise usage.UsageError("--tls-handshake-timeout must be more than 0")
        if not self["listen"]:
            self.opt_listen(DEFAULT_LISTEN)


def makeService(options: Options) -> IService:
    """One child service per C{--listen}, under a L{SocketsService}."""
    config = ServiceConfig(maxLine=options["max-line"], keepOpen=bool(options["keep-open"]))
    root = SocketsService()
    for spec in options["listen"]:
        listeningService(spec, config, root.fail, handshakeTimeout=options["tls-handshake-timeout"]).setServiceParent(root)
    return root
