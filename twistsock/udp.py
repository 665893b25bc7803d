"""
The services over UDP: C{udp:PORT[:interface=ADDR]}.

Twisted has no datagram endpoint strings, and its UDP port can neither tell
which local address a datagram was sent to nor choose the address a reply
leaves from.  This module's port can: it reads with C{recvmsg} and
C{IPV6_RECVPKTINFO}/C{IP_PKTINFO}, and answers from the address the request
arrived on (a client with a connected socket drops a reply from any other).

Every datagram passes a policy before a service sees it, and every reply
after: no truncation, no answers to source port 0 or to the ports of other
datagram services (reflection loops), a per-source token bucket, and no reply
larger than its request.  Each outcome is counted.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ._format import describe, host, splitEndpoint

#: The largest UDP payload (IPv6; IPv4's is 65507).  One byte more is read,
#: so that a longer (jumbo) datagram shows as truncated instead of passing cut.
MAX_DATAGRAM = 65527
_BUFFER = 65536

#: Source ports never answered: 0 (invalid), and the ports of services that
#: answer any datagram, so a spoofed request would start a reflection loop
#: between them and us (Pan et al., "Loop DoS", 2024; US-CERT TA14-017A).
REFLECTING_PORTS = frozenset(
    {
        0,
        7,  # echo
        11,  # systat
        13,  # daytime
        17,  # qotd
        19,  # chargen
        37,  # time
        53,  # DNS
        69,  # TFTP
        111,  # portmap
        123,  # NTP
        137,  # NetBIOS name service
        161,  # SNMP
        162,  # SNMP trap
        389,  # CLDAP
        520,  # RIP
        1900,  # SSDP
        3702,  # WS-Discovery
        5353,  # mDNS
        11211,  # memcached
    }
)

# Python 3.11's socket module lacks IP_PKTINFO; 8 is Linux's value.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
# Plain ints: socket's are enums, and an enum operation per datagram showed in profiles.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_IPPROTO_IP, _IPPROTO_IPV6, _IPV6_PKTINFO = (
    int(socket.IPPROTO_IP),
    int(socket.IPPROTO_IPV6),
    int(socket.IPV6_PKTINFO),
)
# The ancillary data for a reply, by the request's destination: as many as the host has addresses.
_replies: dict[tuple[int, bytes], list] = {}
_MAX_REPLIES = 256

DEFAULT_RATE = 100.0
DEFAULT_BURST = 200
DEFAULT_AMPLIFICATION = 1.0
#: How many sources the rate limiter remembers at once; beyond, the oldest is forgotten.
MAX_SOURCES = 65536
#: How many sources a summary names, busiest first; the rest are added up in one line.
SUMMARY_SOURCES = 20
#: How many sources are counted apart between two summaries; beyond, they count as "other".
COUNTED_SOURCES = 1000
OTHER_SOURCES = "other sources"

# Outcomes, as counted.
ANSWERED = "answered"
NO_REPLY = "no reply"
TRUNCATED = "truncated"
BLOCKED_PORT = "blocked source port"
RATE_LIMITED = "rate limited"
AMPLIFICATION = "reply larger than request"
SEND_FAILED = "send failed"
OUTCOMES = (ANSWERED, NO_REPLY, TRUNCATED, BLOCKED_PORT, RATE_LIMITED, AMPLIFICATION, SEND_FAILED)


@dataclass(frozen=True)
class DatagramPolicy:
    """What a UDP port answers, and how much."""

    #: Packets per second each source address may send (0: no limit).
    rate: float = DEFAULT_RATE
    #: How many packets a source may send at once before the rate applies.
    burst: int = DEFAULT_BURST
    #: A reply may be at most this many times as long as its request.
    amplification: float = DEFAULT_AMPLIFICATION
    #: Source ports that are never answered.
    blockedPorts: frozenset[int] = REFLECTING_PORTS


class TokenBuckets:
    """
    A token bucket per source address: C{rate} tokens a second, at most
    C{burst}.  At most C{limit} sources are remembered; a full bucket is the
    same as a forgotten one, so idle sources are swept away.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float], limit: int = MAX_SOURCES
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.limit = limit
        self._buckets: dict[str, list[float]] = {}
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str) -> bool:
        """Take a token for C{source}; whether there was one."""
        if self.rate <= 0:
            return True
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.limit:
                self._sweep(now)
                if len(self._buckets) >= self.limit:
                    del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[source] = [self.burst, now]
        else:
            tokens, last = bucket
            bucket[0] = min(self.burst, tokens + (now - last) * self.rate)
            bucket[1] = now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        if now - self._swept > self.burst / self.rate:
            self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        """Forget every source whose bucket has filled up again."""
        self._swept = now
        full = [
            s
            for s, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for source in full:
            del self._buckets[source]


@dataclass
class DatagramServer:
    """One datagram service behind a L{DatagramPolicy}, with its counts."""

    name: str
    service: Callable[[bytes, str], bytes | None]
    policy: DatagramPolicy
    clock: Callable[[], float]
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.buckets = TokenBuckets(self.policy.rate, self.policy.burst, self.clock)
        #: Outcomes by source address since the last summary (see L{takeSummary}).
        self.bySource: dict[str, Counter] = {}

    def handle(
        self, data: bytes, sourceHost: str, sourcePort: int, truncated: bool = False
    ) -> bytes | None:
        """
        The reply to send to the source, or None.  Every call counts one
        outcome, except a reply: the sender counts it with L{sent}.
        """
        if truncated:
            self._count(TRUNCATED, sourceHost)
            return None
        if sourcePort in self.policy.blockedPorts:
            self._count(BLOCKED_PORT, sourceHost)
            return None
        if not self.buckets.allow(sourceHost):
            self._count(RATE_LIMITED, sourceHost)
            return None
        peer = f"[{sourceHost}]:{sourcePort}" if ":" in sourceHost else f"{sourceHost}:{sourcePort}"
        reply = self.service(data, peer)
        if reply is None:
            self._count(NO_REPLY, sourceHost)
            return None
        if len(reply) > len(data) * self.policy.amplification:
            self._count(AMPLIFICATION, sourceHost)
            return None
        return reply

    def sent(self, ok: bool, sourceHost: str) -> None:
        """Count a reply as sent, or as failed (the socket's buffer was full)."""
        self._count(ANSWERED if ok else SEND_FAILED, sourceHost)

    def _count(self, outcome: str, source: str) -> None:
        self.counts[outcome] += 1
        counts = self.bySource.get(source)
        if counts is None:
            if len(self.bySource) >= COUNTED_SOURCES:
                source = OTHER_SOURCES
            counts = self.bySource.setdefault(source, Counter())
        counts[outcome] += 1

    def takeSummary(self) -> list[tuple[str, Counter]]:
        """
        The outcomes by source since the last call, busiest first: at most
        L{SUMMARY_SOURCES} sources by name, the rest added up as C{other sources}.
        """
        bySource, self.bySource = self.bySource, {}
        ranked = sorted(
            bySource.items(),
            key=lambda item: (item[0] == OTHER_SOURCES, -sum(item[1].values()), item[0]),
        )
        named = [item for item in ranked if item[0] != OTHER_SOURCES][:SUMMARY_SOURCES]
        rest: Counter[str] = Counter()
        for source, counts in ranked:
            if (source, counts) not in named:
                rest += counts
        return named + ([(OTHER_SOURCES, rest)] if rest else [])


@implementer(IListeningPort, IReadDescriptor)
class DatagramPort:
    """
    A UDP socket in the reactor that answers each datagram from the address
    it was sent to.
    """

    log = Logger()
    #: Datagrams read per turn of the reactor, so that one busy port cannot starve the rest.
    BATCH = 64

    def __init__(
        self,
        reactor: Any,
        port: int,
        interface: str,
        server: DatagramServer,
        summaryInterval: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.server = server
        self.summaryInterval = summaryInterval
        self.socket: socket.socket | None = None
        self._summary: LoopingCall | None = None

    # -- IListeningPort --

    def startListening(self) -> None:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                if self.interface == "::":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((self.interface, self.port))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise CannotListenError(self.interface, self.port, e) from None
        self.socket = sock
        self.family = family
        self.address = describe(self.getHost())
        self.reactor.addReader(self)
        if self.summaryInterval > 0:
            self._summary = LoopingCall(self.summarize)
            self._summary.clock = self.reactor
            self._summary.start(self.summaryInterval, now=False)

    def stopListening(self) -> defer.Deferred[None]:
        if self.socket is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.socket = None
            if self._summary is not None:
                self._summary.stop()
                self._summary = None
            self.summarize()
        return defer.succeed(None)

    def summarize(self) -> None:
        """Log what happened to the datagrams since the last summary, a line per source."""
        for source, counts in self.server.takeSummary():
            self.log.info(
                "{service} udp {address} from {source}: {summary}",
                service=self.server.name,
                transport="udp",
                address=self.address,
                source=source,
                summary=describeCounts(counts),
                counts=dict(counts),
                interval=self.summaryInterval,
            )

    def getHost(self) -> IPv4Address | IPv6Address:
        assert self.socket is not None, "not listening"
        hostname, port = self.socket.getsockname()[:2]
        kind = IPv6Address if self.family == socket.AF_INET6 else IPv4Address
        return kind("UDP", hostname, port)

    # -- IReadDescriptor --

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return f"{self.server.name} (UDP)"

    def connectionLost(self, reason: object) -> None:
        self.stopListening()

    def doRead(self) -> None:
        ancillary = socket.CMSG_SPACE(20)
        for _ in range(self.BATCH):
            if self.socket is None:
                return
            try:
                data, ancdata, flags, source = self.socket.recvmsg(_BUFFER, ancillary)
            except BlockingIOError:
                return
            except OSError as e:
                # An ICMP error for an earlier reply, or the like: nothing to do for it.
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            truncated = bool(flags & _MSG_TRUNC) or len(data) > MAX_DATAGRAM
            sourceHost = host(source[0])
            reply = self.server.handle(data, sourceHost, source[1], truncated)
            if reply is not None:
                self._send(reply, ancdata, source, sourceHost)

    def _send(self, reply: bytes, ancdata: list, destination: tuple, sourceHost: str) -> None:
        """Send from the address the request arrived on."""
        assert self.socket is not None  # doRead reads only while listening
        try:
            self.socket.sendmsg([reply], _replyFrom(ancdata), 0, destination)
        except OSError as e:
            self.server.sent(False, sourceHost)
            self.log.debug("reply to {peer} not sent: {why}", peer=destination, why=e.strerror)
        else:
            self.server.sent(True, sourceHost)


def _replyFrom(ancdata: list) -> list:
    """The ancillary data that makes a reply leave from the request's destination address."""
    for level, kind, data in ancdata:
        if level == _IPPROTO_IPV6 and kind == _IPV6_PKTINFO:
            key = (6, data[:16])
        elif level == _IPPROTO_IP and kind == IP_PKTINFO:
            key = (4, data[8:12])
        else:
            continue
        reply = _replies.get(key)
        if reply is None:
            if len(_replies) >= _MAX_REPLIES:
                _replies.clear()
            reply = _replies[key] = _pktinfo(*key)
        return reply
    return []


def _pktinfo(family: int, destination: bytes) -> list:
    if family == 6:
        # in6_pktinfo: the destination address; interface 0 lets routing choose.
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, destination + struct.pack("I", 0))]
    # in_pktinfo {ifindex, spec_dst, addr}: send from spec_dst, the request's destination.
    return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i", 0) + destination + b"\0\0\0\0")]


class DatagramEndpoint:
    """
    C{udp:PORT[:interface=ADDR]}: listen() takes a L{DatagramServer}, like a
    stream endpoint takes a factory.
    """

    def __init__(
        self, reactor: Any, port: int, interface: str, summaryInterval: float = 60.0
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.summaryInterval = summaryInterval

    def listen(self, server: DatagramServer) -> defer.Deferred[IListeningPort]:
        port = DatagramPort(self.reactor, self.port, self.interface, server, self.summaryInterval)

        def start() -> IListeningPort:
            port.startListening()
            return port

        return defer.execute(start)


def defaultInterface() -> str:
    """C{::} (IPv6 and IPv4 on one socket) where the host has IPv6, else C{0.0.0.0}."""
    if not socket.has_ipv6:
        return "0.0.0.0"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return "::"


def parseUDP(description: str) -> tuple[int, str | None]:
    """
    Parse C{udp:PORT[:interface=ADDR]} (colons in ADDR escaped, as in C{tcp:}).

    @return: the port, and the interface or None for the default.
    @raise ValueError: anything else.
    """
    fields = splitEndpoint(description)
    if fields[0] != "udp" or len(fields) < 2:
        raise ValueError("a UDP endpoint is udp:PORT[:interface=ADDR]")
    port, interface = None, None
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if not sep and port is None:
            port = key
        elif key in ("port",) and port is None:
            port = value
        elif key == "interface" and interface is None:
            interface = value
        else:
            raise ValueError(f"unexpected {item!r} (a UDP endpoint is udp:PORT[:interface=ADDR])")
    if port is None or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad UDP port {port!r}")
    if interface is not None:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"bad interface {interface!r}: an IPv4 or IPv6 address") from None
    return int(port), interface


def describeCounts(counts: Counter) -> str:
    """C{12 answered, 3 rate limited}, in a fixed order, zeros left out."""
    return ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o]) or "nothing"
