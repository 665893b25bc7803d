"""
A Layer (twistsock._layer) is its protocol's transport: what it does not add
passes through to the transport beneath, by name.
"""

from __future__ import annotations

import pytest
from twisted.internet.interfaces import INegotiated, ISSLTransport, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from twistsock._layer import PASSED_THROUGH, Layer
from twistsock.connection import Connection
from twistsock.proxy import ProxyHeaderProtocol


def test_a_layer_has_everything_twisteds_tcp_and_tls_transports_declare():
    """
    Declared by Twisted's transports, so used by protocols above a layer
    (Twisted's TLS, twistsock's services): none may be missing.
    """
    declared = set()
    for interface in (ITCPTransport, ISSLTransport, ISystemHandle, INegotiated):
        declared |= set(interface.names(all=True))
    assert sorted(name for name in declared if not hasattr(Layer, name)) == []


@pytest.mark.parametrize("cls", [Layer, Connection, ProxyHeaderProtocol])
def test_a_layers_attributes_are_plain(cls):
    """
    No __getattr__ or __getattribute__ on the classes a message passes
    through: CPython then looks every attribute of theirs up the slow way.
    """
    assert not hasattr(cls, "__getattr__")
    assert cls.__getattribute__ is object.__getattribute__


class Beneath(StringTransport):
    """A transport with some of the extras (TCP options, a handle), not all."""

    disconnecting = False
    noDelay = False

    def getHandle(self) -> object:
        return "the socket"

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


def test_what_a_layer_does_not_add_is_the_transports_own():
    transport = Beneath()
    layer = Layer(Protocol())
    layer.makeConnection(transport)
    assert layer.getHandle() == "the socket"
    layer.setTcpNoDelay(True)
    assert transport.noDelay is True
    assert layer.disconnecting is False
    transport.disconnecting = True
    assert layer.disconnecting is True  # read through each time, never copied
    # What the transport lacks, the layer lacks: asking for it is the usual test.
    assert getattr(layer, "getPeerCertificate", None) is None
    assert getattr(layer, "negotiatedProtocol", None) is None
    with pytest.raises(AttributeError):
        layer.getTcpKeepAlive  # noqa: B018


def test_only_the_transports_interface_passes_through():
    """Its internals (socket, buffers) stay beneath: what reads them must go to the transport."""
    transport = Beneath()
    transport.socket = object()  # type: ignore[attr-defined]
    layer = Layer(Protocol())
    layer.makeConnection(transport)
    assert not hasattr(layer, "socket")
    assert "socket" not in PASSED_THROUGH
