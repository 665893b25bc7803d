"""
What the TLS library alone costs per 1 KiB echoed message, on one side, and
per handshake, both sides: pyOpenSSL (Twisted's TLS, through cffi) against
the ssl module (asyncio's), in memory, with no sockets and no event loop.

    python bench/tlscost.py [--messages 100000] [--handshakes 1000]

Each side of the exchange does what its server does per message: for
pyOpenSSL what twistsock's DirectTLSProtocol calls (bio_write, recv, the
BIO sizes, send, bio_read), for the ssl module what asyncio's sslproto
calls (write, read until SSLWantReadError, write, read).  A client of the
same library encrypts and decrypts the other half; the time per message is
halved.  A handshake is the server's and the client's work together (the
same certificate, TLS 1.3, no verification on the client), so that only the
library differs.  Run it pinned to one core (taskset -c 0).
"""

from __future__ import annotations

import argparse
import ssl
import sys
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from twistsock import certs

MESSAGE = b"x" * 1024


def _pyOpenSSLPair(
    serverContext: SSL.Context, clientContext: SSL.Context
) -> tuple[SSL.Connection, SSL.Connection]:
    """A handshaken server and client, in memory."""
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()

    def pending(connection: SSL.Connection) -> bytes:
        try:
            return connection.bio_read(65536)
        except SSL.WantReadError:
            return b""

    for _ in range(6):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        if data := pending(client):
            server.bio_write(data)
        if data := pending(server):
            client.bio_write(data)
    return server, client


def _pyOpenSSLContexts(pem: str) -> tuple[SSL.Context, SSL.Context]:
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_chain_file(pem)
    context.use_privatekey_file(pem)
    return context, SSL.Context(SSL.TLS_METHOD)


def _handshakes(contexts, pair, handshakes: int) -> float:
    """Seconds per handshake of C{pair(*contexts)}."""
    start = time.perf_counter()
    for _ in range(handshakes):
        pair(*contexts)
    return (time.perf_counter() - start) / handshakes


def pyOpenSSLHandshakes(pem: str, handshakes: int) -> float:
    return _handshakes(_pyOpenSSLContexts(pem), _pyOpenSSLPair, handshakes)


def pyOpenSSL(pem: str, messages: int) -> float:
    server, client = _pyOpenSSLPair(*_pyOpenSSLContexts(pem))
    size, null = _lib.BIO_get_mem_data, _ffi.NULL
    start = time.perf_counter()
    for _ in range(messages):
        client.send(MESSAGE)
        server.bio_write(client.bio_read(65536))
        data = server.recv(32768)
        size(server._into_ssl, null)
        server.send(data)
        size(server._from_ssl, null)
        back = server.bio_read(65536)
        size(server._from_ssl, null)
        client.bio_write(back)
        client.recv(32768)
    return (time.perf_counter() - start) / messages / 2


def _sslContexts(pem: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    serverContext = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serverContext.load_cert_chain(pem)
    clientContext = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    clientContext.check_hostname = False
    clientContext.verify_mode = ssl.CERT_NONE
    return serverContext, clientContext


def _sslPair(serverContext: ssl.SSLContext, clientContext: ssl.SSLContext):
    """A handshaken server and client, in memory, with their BIOs."""
    serverIn, serverOut, clientIn, clientOut = (ssl.MemoryBIO() for _ in range(4))
    server = serverContext.wrap_bio(serverIn, serverOut, server_side=True)
    client = clientContext.wrap_bio(clientIn, clientOut)
    for _ in range(6):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if data := clientOut.read():
            serverIn.write(data)
        if data := serverOut.read():
            clientIn.write(data)
    return server, client, serverIn, serverOut, clientIn, clientOut


def sslModuleHandshakes(pem: str, handshakes: int) -> float:
    return _handshakes(_sslContexts(pem), _sslPair, handshakes)


def sslModule(pem: str, messages: int) -> float:
    server, client, serverIn, serverOut, clientIn, clientOut = _sslPair(*_sslContexts(pem))
    start = time.perf_counter()
    for _ in range(messages):
        client.write(MESSAGE)
        serverIn.write(clientOut.read())
        data = server.read(262144)
        try:
            server.read(262144)
        except ssl.SSLWantReadError:
            pass
        server.write(data)
        clientIn.write(serverOut.read())
        client.read(262144)
    return (time.perf_counter() - start) / messages / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [
        ("pyOpenSSL", "message per side", pyOpenSSL, args.messages),
        ("ssl module", "message per side", sslModule, args.messages),
        ("pyOpenSSL", "handshake, both sides", pyOpenSSLHandshakes, args.handshakes),
        ("ssl module", "handshake, both sides", sslModuleHandshakes, args.handshakes),
    ]
    results: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    with tempfile.TemporaryDirectory() as directory:
        pem = str(certs.generate(directory).server)
        for _ in range(args.rounds):  # interleaved
            for i, (_, _, measure, count) in enumerate(cases):
                results[i].append(measure(pem, count))
    for i, (name, unit, _, _) in enumerate(cases):
        times = ", ".join(f"{s * 1e6:.2f}" for s in results[i])
        print(
            f"{name:10}  {min(results[i]) * 1e6:8.2f} us per {unit} (best of {args.rounds}: "
            f"{times})"
        )


if __name__ == "__main__":
    main()
