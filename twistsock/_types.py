"""
Types for the type checker only: what twistsock's protocols rely on that
Twisted's annotations do not say.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ISystemHandle, ITCPTransport


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer, ISystemHandle):
    """
    A connected stream transport as twistsock's protocols see it, from
    C{connectionMade} on.  Twisted's TCP, UNIX and TLS transports, and
    L{twistsock._layer.Layer}, are all of these at once (each declares them
    separately, or not at all); C{Protocol.transport} is annotated as a bare
    C{ITransport | None}.  Nothing provides this interface at run time; it
    only names the combination for annotations, as Twisted's own
    C{portforward._MakeTypesHappy} does.
    """
