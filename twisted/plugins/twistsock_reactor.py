"""Dropin: C{twist --reactor=twistsock}, the reactor in L{twistsock.reactor}."""

from twisted.application.reactors import Reactor

twistsock = Reactor(
    "twistsock",
    "twistsock.reactor",
    "epoll(4), without a logging context per socket event (twistsock).",
)
