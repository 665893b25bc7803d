"""
The peers twistsock is measured against, each a few lines, as their users
would write them:

    python bench/peers.py twisted|asyncio|uvloop PORT [PEM]

serves echo on TCP and UDP at 127.0.0.1:PORT, upper (one line, reply,
close) on PORT+1 and, given a PEM file holding a key and its certificate,
echo over TLS on PORT+2 (Twisted's ssl, or asyncio with the ssl module);
prints "listening PORT" once ready.
"""

from __future__ import annotations

import sys


def twisted(port: int, pem: str | None = None) -> None:
    from twisted.internet import protocol, reactor, ssl

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    class Upper(protocol.Protocol):
        buffer = b""

        def dataReceived(self, data):
            self.buffer += data
            if b"\n" in self.buffer:
                self.transport.write(self.buffer.split(b"\n", 1)[0].upper() + b"\n")
                self.transport.loseConnection()

    class UDPEcho(protocol.DatagramProtocol):
        def datagramReceived(self, data, address):
            self.transport.write(data, address)

    reactor.listenTCP(port, protocol.Factory.forProtocol(Echo), interface="127.0.0.1", backlog=4096)
    reactor.listenTCP(
        port + 1, protocol.Factory.forProtocol(Upper), interface="127.0.0.1", backlog=4096
    )
    reactor.listenUDP(port, UDPEcho(), interface="127.0.0.1", maxPacketSize=65536)
    if pem:
        options = ssl.PrivateCertificate.loadPEM(open(pem).read()).options()
        reactor.listenSSL(
            port + 2,
            protocol.Factory.forProtocol(Echo),
            options,
            interface="127.0.0.1",
            backlog=4096,
        )
    reactor.callWhenRunning(print, f"listening {port}", flush=True)
    reactor.run()


def asyncio_(port: int, pem: str | None = None, loopFactory=None) -> None:
    import asyncio
    import ssl

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    class Upper(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""

        def data_received(self, data):
            self.buffer += data
            if b"\n" in self.buffer:
                self.transport.write(self.buffer.split(b"\n", 1)[0].upper() + b"\n")
                self.transport.close()

    class UDPEcho(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, address):
            self.transport.sendto(data, address)

    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        await loop.create_server(Upper, "127.0.0.1", port + 1, backlog=4096)
        await loop.create_datagram_endpoint(UDPEcho, local_addr=("127.0.0.1", port))
        if pem:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(pem)
            await loop.create_server(Echo, "127.0.0.1", port + 2, ssl=context, backlog=4096)
        print(f"listening {port}", flush=True)
        await asyncio.Event().wait()

    if loopFactory:
        asyncio.set_event_loop_policy(loopFactory())
    asyncio.run(main())


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    pem = sys.argv[3] if len(sys.argv) > 3 else None
    if kind == "twisted":
        twisted(port, pem)
    elif kind == "asyncio":
        asyncio_(port, pem)
    elif kind == "uvloop":
        import uvloop

        asyncio_(port, pem, uvloop.EventLoopPolicy)
    else:
        raise SystemExit(f"unknown peer {kind}")
