"""The `twist sockets` dropin: it only points at twistsock.tap."""

from twisted.application.service import ServiceMaker

twistsockSockets = ServiceMaker(
    "twistsock sockets",
    "twistsock.tap",
    "Serve echo, upper, sink and ack on any Twisted endpoint.",
    "sockets",
)
