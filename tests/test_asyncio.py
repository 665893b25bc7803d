"""
twistsock.client from asyncio code: Twisted's asyncio reactor on the loop
that asyncio.run() drives (the reactor itself never runs).  A subprocess,
since this test process already has its reactor.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import WAIT, startServer

from twistsock import certs

PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    from twisted.internet import asyncioreactor

    async def main(port, tlsPort, ca):
        loop = asyncio.get_running_loop()
        asyncioreactor.install(loop)
        from twistsock import client

        targets = [("127.0.0.1", port), ("localhost", port)]
        targets += [f"tcp:127.0.0.1:{port}", f"tcp:localhost:{port}"]
        for target in targets:
            print(await client.echo(target, b"hi", timeout=5).asFuture(loop))
        tls = f"tls:localhost:{tlsPort}"
        print(await client.echo(tls, b"tls", ca=ca, timeout=5).asFuture(loop))
        try:
            await client.echo(("nosuch.invalid", port), b"x", timeout=5).asFuture(loop)
        except client.UnknownHost as e:
            print("unknown host")

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
    """
)


def test_the_client_from_asyncio_run(tmp_path):
    material = certs.generate(tmp_path / "certs")
    server = startServer(
        "--listen",
        "echo@tcp:0:interface=127.0.0.1",
        "--listen",
        f"echo@ssl:0:privateKey={material.server}:interface=127.0.0.1",
    )
    try:
        ports = {e.endpoint.split(":")[0]: e.port for e in server.listening}
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM, str(ports["tcp"]), str(ports["ssl"]), str(material.ca)],
            capture_output=True,
            timeout=WAIT,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["b'hi'"] * 4 + ["b'tls'", "unknown", "host"]
