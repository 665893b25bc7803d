"""
What the TLS library alone costs per 1 KiB echoed message, on one side:
pyOpenSSL (Twisted's TLS, through cffi) against the ssl module (asyncio's),
in memory, with no sockets and no event loop.

    python bench/tlscost.py [--messages 100000]

Each side of the exchange does what its server does per message: for
pyOpenSSL what twistsock's DirectTLSProtocol calls (bio_write, recv, the
BIO sizes, send, bio_read), for the ssl module what asyncio's sslproto
calls (write, read until SSLWantReadError, write, read).  A client of the
same library encrypts and decrypts the other half; the time per message is
halved.  Run it pinned to one core (taskset -c 0).
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
from twistsock import certs  # noqa: E402

MESSAGE = b"x" * 1024


def pyOpenSSL(pem: str, messages: int) -> float:
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_chain_file(pem)
    context.use_privatekey_file(pem)
    server = SSL.Connection(context, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
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


def sslModule(pem: str, messages: int) -> float:
    serverContext = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serverContext.load_cert_chain(pem)
    clientContext = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    clientContext.check_hostname = False
    clientContext.verify_mode = ssl.CERT_NONE
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
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pem = str(certs.generate(directory).server)
        results: dict[str, list[float]] = {"pyOpenSSL": [], "ssl module": []}
        for _ in range(args.rounds):  # interleaved
            results["pyOpenSSL"].append(pyOpenSSL(pem, args.messages))
            results["ssl module"].append(sslModule(pem, args.messages))
    for name, seconds in results.items():
        best = min(seconds) * 1e6
        print(f"{name:10}  {best:5.2f} us per message per side (best of {args.rounds}: {', '.join(f'{s * 1e6:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
