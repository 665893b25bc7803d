"""
C{twist sockets}: options in, a tree of listening services out.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet.protocol import Factory
from twisted.python import usage

from . import connection, logs, udp, workers
from ._format import oneLine
from .connection import DEFAULT_HANDSHAKE_TIMEOUT
from .endpoints import serverFromString
from .listen import ListenSpec, SocketsService, checkEndpoint, isUDP, listeningService, parseListen
from .services import DEFAULT_MAX_LINE, ServiceConfig

DEFAULT_LISTEN = "echo@tcp:5000"


def _number(option: str, kind: type) -> Callable[[str], Any]:
    """
    A coercer whose error names the option (Twisted's only says "Parameter type
    enforcement failed").
    """

    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(
                f"--{option}: {text!r} is not a {'whole ' if kind is int else ''}number"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"--{option}: {text!r} is not a finite number")
        return value

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


#: The most worker processes --workers starts.
MAX_WORKERS = 256


class Options(usage.Options):
    """The options of C{twist sockets}."""

    synopsis = "[--listen [SERVICE@]ENDPOINT ...] [options]"
    longdesc = (
        "Serve the classic socket services on Twisted endpoints. SERVICE is one of "
        "echo, upper, sink, ack (default echo); ENDPOINT is any Twisted server "
        "endpoint string: tcp:5000, tcp6:5000, unix:/tmp/echo.sock, ssl:..., tls:DIR, "
        "mtls:..., proxy:ENDPOINT, systemd:..., or udp:PORT[:interface=ADDR]. "
        "TLS endpoints (ssl:, tls:, mtls:) follow Mozilla's intermediate profile; "
        "add :profile=modern for TLS 1.3 only. "
        f"With no --listen: {DEFAULT_LISTEN}."
    )
    optFlags = [
        [
            "keep-open",
            None,
            "upper: answer every line until the client closes (default: one line per connection).",
        ],
    ]
    optParameters = [
        [
            "max-line",
            None,
            DEFAULT_MAX_LINE,
            "upper, ack: longest line accepted, in bytes.",
            _number("max-line", int),
        ],
        [
            "tls-handshake-timeout",
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            "Seconds a TLS client has to finish its handshake.",
            _number("tls-handshake-timeout", float),
        ],
        [
            "udp-rate",
            None,
            udp.DEFAULT_RATE,
            "UDP: datagrams per second answered per source address (0: no limit).",
            _number("udp-rate", float),
        ],
        [
            "udp-burst",
            None,
            udp.DEFAULT_BURST,
            "UDP: datagrams a source may send at once before --udp-rate applies.",
            _number("udp-burst", int),
        ],
        [
            "udp-amplification",
            None,
            udp.DEFAULT_AMPLIFICATION,
            "UDP: a reply may be at most this many times its request's size.",
            _number("udp-amplification", float),
        ],
        [
            "udp-blocked-ports",
            None,
            "reflecting",
            "UDP: source ports never answered: 'reflecting' (see docs/udp.md), "
            "'none' (only port 0), or a comma-separated list.",
        ],
        [
            "udp-summary-interval",
            None,
            60.0,
            "UDP: seconds between summaries of what happened to the datagrams (0: only at exit).",
            _number("udp-summary-interval", float),
        ],
        [
            "max-connections",
            None,
            connection.DEFAULT_MAX_CONNECTIONS,
            "Stream connections served at once, over all ports (0: no limit).",
            _number("max-connections", int),
        ],
        [
            "max-per-peer",
            None,
            0,
            "Stream connections served at once per client address (0: no limit).",
            _number("max-per-peer", int),
        ],
        [
            "idle-timeout",
            None,
            connection.DEFAULT_IDLE_TIMEOUT,
            "Seconds without a byte from the client before its connection is closed (0: never).",
            _number("idle-timeout", float),
        ],
        [
            "line-timeout",
            None,
            connection.DEFAULT_LINE_TIMEOUT,
            "upper, ack: seconds a client has to send a whole line, from its first byte "
            "(0: no limit).",
            _number("line-timeout", float),
        ],
        [
            "proxy-header-timeout",
            None,
            connection.DEFAULT_PROXY_TIMEOUT,
            "proxy: endpoints: seconds a client has to send its PROXY header (0: no limit).",
            _number("proxy-header-timeout", float),
        ],
        [
            "peer-network",
            None,
            "32,64",
            "What --max-per-peer counts as one client: the IPv4 and IPv6 prefix lengths "
            "(32,64: an IPv4 address, an IPv6 /64; 24,48 for networks).",
        ],
        [
            "drain-timeout",
            None,
            connection.DEFAULT_DRAIN_TIMEOUT,
            "Seconds open connections have to finish after SIGTERM or SIGINT.",
            _number("drain-timeout", float),
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics and a health check at /healthz on this "
            "endpoint (e.g. tcp:9100:interface=127.0.0.1).",
        ],
        [
            "log-buffer",
            None,
            logs.BUFFER_LIMIT,
            "Bytes of log lines held while the log output is slow; past that, lines are "
            "dropped and counted.",
            _number("log-buffer", int),
        ],
        [
            "workers",
            None,
            0,
            "Serve stream connections in this many worker processes that share the listening "
            "sockets (0: in this process).",
            _number("workers", int),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        listen: list[ListenSpec] = []  # one for every --listen
        self["listen"] = listen
        self.argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse; a configuration error (a malformed or unknown option, a bad
        --listen, a certificate file that cannot be read) is one line on
        standard error and exit status 1, before anything listens.  (twist's
        own handling of a usage error prints the whole option list.)
        """
        # Kept to start workers with the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            error = ConfigurationError(str(e).removeprefix("Parameter type enforcement failed: "))
            sys.stderr.write(
                f"twistsock: error: {error.message} (twist sockets --help lists the options)\n"
            )
            sys.stderr.flush()
            raise error from None

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
        if (
            self["udp-rate"] < 0
            or self["udp-burst"] < 1
            or self["udp-amplification"] <= 0
            or self["udp-summary-interval"] < 0
        ):
            raise usage.UsageError(
                "--udp-rate and --udp-summary-interval must be 0 or more, --udp-burst at "
                "least 1, --udp-amplification more than 0"
            )
        self["udp-blocked-ports"] = _ports(self["udp-blocked-ports"])
        if not 0 <= self["workers"] <= MAX_WORKERS:
            raise usage.UsageError(
                f"--workers must be from 0 to {MAX_WORKERS} (one per core is the most that helps)"
            )
        # A worker of a --workers master is told so in its environment, not by an option.
        worker = os.environ.pop(workers.WORKER, None)
        self["worker"] = None
        if worker is not None:
            try:
                self["worker"] = workers.parseWorker(worker)
            except ValueError:
                raise usage.UsageError(
                    f"{workers.WORKER} is for a --workers master's use"
                ) from None
        if (
            self["max-connections"] < 0
            or self["max-per-peer"] < 0
            or self["idle-timeout"] < 0
            or self["drain-timeout"] < 0
        ):
            raise usage.UsageError(
                "--max-connections, --max-per-peer, --idle-timeout and --drain-timeout must "
                "be 0 or more"
            )
        if self["line-timeout"] < 0 or self["proxy-header-timeout"] < 0:
            raise usage.UsageError("--line-timeout and --proxy-header-timeout must be 0 or more")
        self["peer-network"] = _prefixes(self["peer-network"])
        if self["metrics"] is not None:
            try:
                checkEndpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {e}") from None
        if not self["listen"]:
            self.opt_listen(DEFAULT_LISTEN)
        if not 4096 <= self["log-buffer"] <= 1 << 30:
            raise usage.UsageError("--log-buffer must be from 4096 to 1073741824 (1 GiB)")
        self._configureTwist(getattr(self, "parent", None))

    def _configureTwist(self, twist: Any) -> None:
        """
        Under C{twist}, which parses us before it installs the reactor and
        starts logging: the twistsock reactor unless the user named one
        (C{--reactor}), and the log lines of L{twistsock.logs}, in the format
        C{twist} chose (C{--log-format}).  twistd is left as it is.
        """
        if twist is None or "fileLogObserverFactory" not in twist or "reactorName" not in twist:
            return
        if "reactor" not in twist:
            twist["reactorName"] = "twistsock"
        twist["fileLogObserverFactory"] = logs.observerFactory(
            twist.get("logFormat", "text"),
            self["log-buffer"],
            twist.get("logLevel", logs.LogLevel.info),
        )


class ConfigurationError(SystemExit):
    """A bad command line: says so in one line on standard error, and exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = oneLine(message)


def makeService(options: Options) -> IService:
    """
    One child service per C{--listen}, under a L{SocketsService}; with
    C{--workers}, a master that holds the stream sockets for its workers.
    """
    from twisted.internet import reactor

    config = ServiceConfig(maxLine=options["max-line"], keepOpen=bool(options["keep-open"]))
    datagrams = udp.DatagramPolicy(
        rate=options["udp-rate"],
        burst=options["udp-burst"],
        amplification=options["udp-amplification"],
        blockedPorts=options["udp-blocked-ports"],
    )
    connections = connection.Connections(
        maxConnections=options["max-connections"],
        maxPerPeer=options["max-per-peer"],
        idleTimeout=options["idle-timeout"],
        lineTimeout=options["line-timeout"],
        proxyTimeout=options["proxy-header-timeout"],
        peerPrefixes=options["peer-network"],
    )
    shared = dict(connections=connections, drainTimeout=options["drain-timeout"])
    worker = options["worker"]
    root: SocketsService
    if worker is not None:
        index, held, report = worker
        root = workers.WorkerService(index, report, **shared)
    elif options["workers"]:
        root = workers.MasterService(options["workers"], workers.workerArgv(options.argv), **shared)
    else:
        root = SocketsService(**shared)

    streams = [spec for spec in options["listen"] if not isUDP(spec)]
    for spec in options["listen"]:
        if worker is not None and isUDP(spec):
            continue  # the master serves UDP
        if options["workers"] and worker is None and not isUDP(spec):
            # The master only holds the socket: it never accepts, so any factory does.
            endpoint = serverFromString(reactor, spec.endpoint)
            unused = Factory()
            unused.noisy = False
            workers.HeldPort(spec, endpoint, unused, root.fail).setServiceParent(root)
            continue
        adopt = None
        if worker is not None:
            fd, family = worker[1][streams.index(spec)]
            adopt = workers.AdoptingReactor(reactor, fd, family)
        listeningService(
            spec,
            config,
            root.fail,
            connections=connections,
            handshakeTimeout=options["tls-handshake-timeout"],
            datagrams=datagrams,
            summaryInterval=options["udp-summary-interval"],
            reactor=adopt,
            worker=worker[0] if worker is not None else None,
        ).setServiceParent(root)
    if options["metrics"] is not None and worker is None:
        root.serveMetrics(options["metrics"])
    return root


def _ports(text: str) -> frozenset[int]:
    """--udp-blocked-ports: 'reflecting', 'none', or a list; port 0 is always blocked."""
    if text == "reflecting":
        return udp.REFLECTING_PORTS
    if text == "none":
        return frozenset({0})
    try:
        ports = {int(p) for p in text.split(",") if p.strip()}
    except ValueError:
        raise usage.UsageError(
            f"--udp-blocked-ports: {text!r} is not 'reflecting', 'none' or a list of ports"
        ) from None
    if any(not 0 <= p <= 65535 for p in ports):
        raise usage.UsageError("--udp-blocked-ports: ports are 0 to 65535")
    return frozenset(ports | {0})


def _prefixes(text: str) -> tuple[int, int]:
    """--peer-network: C{V4,V6} prefix lengths, 0-32 and 0-128."""
    try:
        v4, v6 = (int(part) for part in text.split(","))
    except ValueError:
        raise usage.UsageError(
            f"--peer-network: {text!r} is not two prefix lengths such as 32,64"
        ) from None
    if not (0 <= v4 <= 32 and 0 <= v6 <= 128):
        raise usage.UsageError(
            f"--peer-network: {text!r}: the IPv4 prefix is 0 to 32, the IPv6 one 0 to 128"
        )
    return v4, v6
