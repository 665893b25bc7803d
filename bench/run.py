"""
The benchmark: the same workloads against twistsock and its peers, in one run.

    python bench/run.py [--rounds 3] [--seconds 3] [--only WORKLOAD] [--write BENCHMARKS.md]

Method: the server is pinned to core 0 and the compiled load generator
(bench/loadgen.c) to core 1; every server is started fresh for every cell;
rounds are interleaved (A B C ... A B C ...), ratios are taken within a round,
and medians are reported with the spread (min-max). Every server, asyncio
ones included, gets one connect-and-close before it is measured (the
readiness probe): a fresh CPython 3.11 asyncio server reads with 256 KiB
buffers that glibc maps and unmaps on every read until it has seen one
connection close.

twistsock runs as users run it: `twist sockets` with every per-connection
feature on (records logged to a file, in JSON as when the README's command
writes to a file; limits; idle timeout), on the reactor it chooses (the
twistsock reactor); "twistsock default reactor" is the same on Twisted's
default.  Only the UDP per-source rate limit is off (--udp-rate 0), since all
load comes from one address.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SERVER_CORE, CLIENT_CORE = "0", "1"


@dataclass(frozen=True)
class Workload:
    name: str
    unit: str
    args: tuple[str, ...]  # loadgen mode and its arguments after HOST PORT
    portOffset: int = 0  # upper listens on PORT+1, TLS echo on PORT+2
    needs: str = "tcp"
    tool: str = "loadgen"  # or tlsload


WORKLOADS = [
    Workload("echo 1 KiB x 10", "req/s", ("pingpong", "{port}", "10", "1024", "{seconds}")),
    Workload("echo 64 KiB x 10", "req/s", ("pingpong", "{port}", "10", "65536", "{seconds}")),
    Workload("echo 1 KiB x 100", "req/s", ("pingpong", "{port}", "100", "1024", "{seconds}")),
    Workload(
        "connections/s (upper)",
        "conn/s",
        ("connect", "{port}", "8", "{seconds}"),
        portOffset=1,
        needs="upper",
    ),
    Workload("bulk echo", "MB/s", ("bulk", "{port}", "{seconds}")),
    Workload("UDP echo 64 B x 10", "dgram/s", ("udp", "{port}", "10", "64", "{seconds}")),
    Workload(
        "TLS echo 1 KiB x 10",
        "req/s",
        ("pingpong", "{port}", "10", "1024", "{seconds}"),
        portOffset=2,
        needs="tls",
        tool="tlsload",
    ),
    Workload(
        "TLS handshakes/s",
        "hs/s",
        ("handshake", "{port}", "8", "{seconds}"),
        portOffset=2,
        needs="tls",
        tool="tlsload",
    ),
]
IDLE = 5000


def servers(
    build: Path, logs: Path, pypy: str | None = None
) -> dict[str, tuple[Callable[[int], list[str]], set[str]]]:
    """Each server: a function of the port to its command line, and what it serves."""
    python = sys.executable
    peers = str(HERE / "peers.py")
    pem = str(build / "certs" / "server.pem")

    def twistsock(
        port: int, reactor: str | None = None, twist: tuple[str, ...] = (str(BIN / "twist"),)
    ) -> list[str]:
        # As the README starts it, its log in a file: JSON (not a terminal), the twistsock reactor
        # unless another is named.
        chosen = [f"--reactor={reactor}"] if reactor else []
        return [
            *twist,
            *chosen,
            f"--log-file={logs / f'twistsock-{port}.log'}",
            "sockets",
            "--listen",
            f"echo@tcp:{port}:interface=127.0.0.1:backlog=4096",
            "--listen",
            f"upper@tcp:{port + 1}:interface=127.0.0.1:backlog=4096",
            "--listen",
            f"echo@udp:{port}:interface=127.0.0.1",
            "--listen",
            f"echo@ssl:{port + 2}:interface=127.0.0.1:backlog=4096:privateKey={pem}:certKey={pem}",
            "--udp-rate",
            "0",
        ]

    every = {"tcp", "upper", "udp", "tls"}
    table = {
        "twistsock": (twistsock, every),
        "twistsock default reactor": (lambda p: twistsock(p, "default"), every),
        "twisted": (lambda p: [python, peers, "twisted", str(p), pem], every),
        "asyncio": (lambda p: [python, peers, "asyncio", str(p), pem], every),
        "uvloop": (lambda p: [python, peers, "uvloop", str(p), pem], every),
        "C epoll": (lambda p: [str(build / "cecho"), str(p)], {"tcp", "udp"}),
    }
    if pypy:
        # twistsock from this checkout (PyPy may be older than the package's requires-python).
        withPath = ("env", f"PYTHONPATH={HERE.parent}", pypy)
        table["twistsock pypy"] = (
            lambda p: twistsock(p, None, (*withPath, "-m", "twisted")),
            every,
        )
        table["twisted pypy"] = (lambda p: [pypy, peers, "twisted", str(p), pem], every)
        table["asyncio pypy"] = (lambda p: [pypy, peers, "asyncio", str(p), pem], every)
    return table


def build(directory: Path) -> None:
    """Compile the load generators and the C server; make the TLS server's certificate."""
    for name in ("loadgen", "cecho"):
        subprocess.run(
            ["cc", "-O2", "-o", str(directory / name), str(HERE / f"{name}.c")], check=True
        )
    subprocess.run(
        [
            "cc",
            "-O2",
            "-o",
            str(directory / "tlsload"),
            str(HERE / "tlsload.c"),
            "-lssl",
            "-lcrypto",
            "-lpthread",
        ],
        check=True,
    )
    subprocess.run(
        [str(BIN / "twistsock"), "certs", str(directory / "certs")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def freePorts() -> int:
    """
    A port P with P, P+1 and P+2 free for TCP and UDP on 127.0.0.1, below
    Linux's ephemeral range (32768-60999) that the load generators' own
    sockets take.  Bound with SO_REUSEADDR, as every server here binds: the
    connections workload leaves thousands of TIME_WAIT entries behind.
    """
    import random

    while True:
        port = random.randrange(10000, 32000, 3)
        if all(
            _free(port + i, kind)
            for i in (0, 1, 2)
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
        ):
            return port


def _free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def cpuSeconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:  # ready when it accepts; this connect-and-close is also the asyncio priming
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {argv}") from None
                time.sleep(0.05)
        time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(tools: Path, workload: Workload, server: Server, seconds: float) -> tuple[float, float]:
    """Run one cell: the rate, and the server's CPU microseconds per request."""
    import json

    args = [
        a.format(port=server.port + workload.portOffset, seconds=seconds) for a in workload.args
    ]
    before = cpuSeconds(server.process.pid)
    result = subprocess.run(
        ["taskset", "-c", CLIENT_CORE, str(tools / workload.tool), args[0], "127.0.0.1", *args[1:]],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    after = cpuSeconds(server.process.pid)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr.strip()}")
    figures = json.loads(result.stdout)
    requests = figures.get("requests") or figures.get("bytes", 0) / 1024
    return figures["rate"], (after - before) * 1e6 / max(requests, 1)


def idleMemory(loadgen: Path, server: Server) -> float:
    """Server memory per idle connection, in KiB, over IDLE connections."""
    before = rss(server.process.pid)
    holder = subprocess.Popen(
        [
            "taskset",
            "-c",
            CLIENT_CORE,
            str(loadgen),
            "idle",
            "127.0.0.1",
            str(server.port),
            str(IDLE),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().startswith("ready"), "idle connections not made"
        last, stable = -1, 0
        for _ in range(100):  # until the server has taken them all in: its memory stops growing
            time.sleep(0.1)
            now = rss(server.process.pid)
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 5:
                break
        return (last - before) / IDLE / 1024
    finally:
        holder.stdin.close()
        holder.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--only", action="append", help="run only workloads whose name contains this"
    )
    parser.add_argument(
        "--pypy",
        metavar="PYTHON",
        help=(
            "also run twistsock, Twisted and asyncio on this PyPy (warmed up for --warmup seconds "
            "of the same load first)"
        ),
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of load before a PyPy cell is measured (default: 3)",
    )
    parser.add_argument("--servers", help="comma-separated servers to run (default: all)")
    parser.add_argument(
        "--write", type=Path, help="also write the results as Markdown to this file"
    )
    args = parser.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit(
            "the benchmark needs 2 cores: one for the server, one for the load generator"
        )

    work = Path(tempfile.mkdtemp(prefix="twistsock-bench-"))
    try:
        build(work)
        loadgen = work / "loadgen"
        table = servers(work, work, args.pypy)
        if args.servers:
            table = {name: table[name] for name in args.servers.split(",")}
        workloads = [w for w in WORKLOADS if not args.only or any(o in w.name for o in args.only)]
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        ratios: dict[tuple[str, str], list[float]] = {}
        for round in range(args.rounds):
            for workload in workloads:
                rates = {}
                for name, (command, serves) in table.items():
                    if workload.needs not in serves:
                        continue
                    port = freePorts()
                    server = Server(command(port), port)
                    try:
                        if name.endswith("pypy"):  # let the JIT compile the hot path first
                            measure(work, workload, server, args.warmup)
                        rate, cpu = measure(work, workload, server, args.seconds)
                    finally:
                        server.stop()
                    rates[name] = rate
                    results.setdefault((workload.name, name), []).append((rate, cpu))
                    print(
                        f"round {round + 1} {workload.name:24} {name:17} {rate:12.1f} "
                        f"{workload.unit:7} {cpu:8.1f} us/req",
                        flush=True,
                    )
                for name, rate in rates.items():
                    # twistsock against plain Twisted too: the server it is built on.
                    bases = ("twisted",) if name.startswith("twistsock") else ()
                    for base in (*bases, "asyncio", "uvloop", "C epoll"):
                        if base in rates:
                            ratios.setdefault((workload.name, f"{name}/{base}"), []).append(
                                rate / rates[base]
                            )
            if not args.only or any("idle" in o for o in args.only):
                for name, (command, _serves) in table.items():
                    port = freePorts()
                    server = Server(command(port), port)
                    try:
                        kib = idleMemory(loadgen, server)
                    finally:
                        server.stop()
                    results.setdefault(("idle memory", name), []).append((kib, 0.0))
                    print(
                        f"round {round + 1} {'idle memory':24} {name:17} {kib:12.2f} KiB/conn",
                        flush=True,
                    )
        report = render(results, ratios, workloads, args)
        print(report)
        if args.write:
            args.write.write_text(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(results, ratios, workloads, args) -> str:
    lines = [
        "# twistsock benchmarks",
        "",
        f"Run with `python bench/run.py --rounds {args.rounds} --seconds {args.seconds:g}` on "
        f"{platform.node() and 'this machine'}: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Server on core {SERVER_CORE}, "
        f"load generator (C, epoll) on core {CLIENT_CORE}; "
        "every server started fresh for every cell and primed with one connect-and-close; "
        "medians of the rounds, spread min-max; ratios taken within a round.",
        "",
        "| workload | server | median | spread | server CPU per request |",
        "|---|---|---|---|---|",
    ]
    units = {w.name: w.unit for w in workloads}
    units["idle memory"] = "KiB/conn"
    for (workload, name), values in results.items():
        rates = [v[0] for v in values]
        cpu = statistics.median(v[1] for v in values)
        cpuText = f"{cpu:.1f} us" if cpu else ""
        lines.append(
            f"| {workload} | {name} | {statistics.median(rates):,.1f} {units[workload]} | "
            f"{min(rates):,.1f} - {max(rates):,.1f} | {cpuText} |"
        )
    lines += ["", "| workload | ratio | median | spread |", "|---|---|---|---|"]
    for (workload, pair), values in ratios.items():
        if pair.split("/")[0].startswith(("twistsock", "twisted")):
            lines.append(
                f"| {workload} | {pair} | {statistics.median(values):.2f}x | "
                f"{min(values):.2f} - {max(values):.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
