"""The datagram policy, token buckets and twins, without sockets (a fake clock, no sleeps)."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher

from twistsock import udp
from twistsock.listen import ListenSpec, parseListen
from twistsock.services import DATAGRAM_SERVICES
from twistsock.tap import Options


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def server(name="echo", **policy):
    clock = Clock()
    return udp.DatagramServer(
        name, DATAGRAM_SERVICES[name], udp.DatagramPolicy(**policy), clock
    ), clock


@pytest.mark.parametrize(
    "text, expected",
    [
        ("udp:5000", (5000, None)),
        ("udp:0:interface=127.0.0.1", (0, "127.0.0.1")),
        ("udp:5000:interface=\\:\\:1", (5000, "::1")),
        ("udp:port=7000", (7000, None)),
    ],
)
def test_parse_udp(text, expected):
    assert udp.parseUDP(text) == expected


@pytest.mark.parametrize(
    "text",
    ["udp:", "udp:x", "udp:70000", "udp:5000:interface=localhost", "udp:5000:backlog=5", "udp:1:2"],
)
def test_parse_udp_errors(text):
    with pytest.raises(ValueError):
        udp.parseUDP(text)


def test_listen_accepts_udp_for_every_service_and_refuses_wrappers():
    for name in DATAGRAM_SERVICES:
        assert parseListen(f"{name}@udp:0") == ListenSpec(name, "udp:0")
    with pytest.raises(ValueError, match="PROXY header cannot come before datagrams"):
        parseListen("proxy:udp:0")
    with pytest.raises(ValueError, match="bad endpoint 'udp:x'"):
        parseListen("udp:x")


def test_blocked_ports_option():
    options = Options()
    options.parseOptions([])
    assert options["udp-blocked-ports"] == udp.REFLECTING_PORTS
    options = Options()
    options.parseOptions(["--udp-blocked-ports", "none"])
    assert options["udp-blocked-ports"] == {0}
    options = Options()
    options.parseOptions(["--udp-blocked-ports", "7,19"])
    assert options["udp-blocked-ports"] == {0, 7, 19}
    for bad in (
        ["--udp-blocked-ports", "x"],
        ["--udp-blocked-ports", "70000"],
        ["--udp-burst", "0"],
        ["--udp-rate", "-1"],
    ):
        with pytest.raises(SystemExit):
            Options().parseOptions(bad)


def test_reflecting_ports_cover_the_classic_loop_services():
    assert {0, 7, 13, 17, 19} <= udp.REFLECTING_PORTS


# -- the twins --


def test_twins():
    assert DATAGRAM_SERVICES["echo"](b"\x00hi\xff", "p") == b"\x00hi\xff"
    assert DATAGRAM_SERVICES["upper"]("straße\n".encode(), "p") == "STRAßE\n".encode()
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        assert DATAGRAM_SERVICES["sink"](b"Half a league", "127.0.0.1:9") is None
        assert DATAGRAM_SERVICES["ack"](b"hello\n", "[::1]:9") == b"I got your message"
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [formatEvent(e) for e in observer] == [
        "127.0.0.1:9 -->Half a league",
        "[::1]:9 Here is the message: hello",
    ]


# -- the policy --


def test_echo_answers_and_counts_once_sent():
    s, _ = server()
    assert s.handle(b"x" * 65507, "127.0.0.1", 40000) == b"x" * 65507
    s.sent(True, "127.0.0.1")
    assert s.counts == {"answered": 1}


def test_truncated_datagrams_are_dropped_not_answered_cut():
    s, _ = server()
    assert s.handle(b"x" * 100, "127.0.0.1", 40000, truncated=True) is None
    assert s.counts == {"truncated": 1}


@pytest.mark.parametrize("port", [0, 7, 13, 17, 19, 53, 123, 11211])
def test_reflecting_source_ports_are_dropped_and_counted(port):
    s, _ = server()
    assert s.handle(b"ping", "127.0.0.1", port) is None
    assert s.counts == {"blocked source port": 1}


def test_no_reply_larger_than_the_request_by_default():
    s, _ = server("ack")
    assert s.handle(b"x", "127.0.0.1", 40000) is None  # 18 bytes for 1: no
    assert s.handle(b"eighteen bytes!!!!", "127.0.0.1", 40000) == b"I got your message"
    assert s.counts == {"reply larger than request": 1}


def test_amplification_can_be_allowed():
    s, _ = server("ack", amplification=20)
    assert s.handle(b"x", "127.0.0.1", 40000) == b"I got your message"


def test_sink_answers_nothing():
    s, _ = server("sink")
    assert s.handle(b"data", "127.0.0.1", 40000) is None
    assert s.counts == {"no reply": 1}


def test_rate_limit_per_source_with_burst_and_refill():
    s, clock = server(rate=10, burst=3)
    answers = [s.handle(b"p", "192.0.2.1", 40000) for _ in range(5)]
    assert answers == [b"p", b"p", b"p", None, None]
    # Another source has its own bucket.
    assert s.handle(b"p", "192.0.2.2", 40000) == b"p"
    clock.now += 0.1  # one token back
    assert s.handle(b"p", "192.0.2.1", 40000) == b"p"
    assert s.handle(b"p", "192.0.2.1", 40000) is None
    assert s.counts["rate limited"] == 3


def test_rate_zero_means_no_limit():
    s, _ = server(rate=0, burst=1)
    assert all(s.handle(b"p", "192.0.2.1", 40000) for _ in range(1000))


def test_buckets_forget_idle_sources_and_stay_bounded():
    clock = Clock()
    buckets = udp.TokenBuckets(rate=100, burst=10, clock=clock, limit=1000)
    for i in range(5000):
        buckets.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets) <= 1000
    clock.now += 1  # every bucket is full again
    buckets.allow("192.0.2.1")
    assert len(buckets) == 1


def test_a_flood_from_one_source_is_held_to_the_rate():
    s, clock = server(rate=100, burst=200)
    answered = 0
    for _ in range(100_000):
        clock.now += 0.0001  # 10,000 datagrams a second for 10 s
        answered += s.handle(b"p", "192.0.2.1", 40000) is not None
    assert 200 + 100 * 10 - 5 <= answered <= 200 + 100 * 10 + 5
    assert len(s.buckets) == 1


def test_describe_counts():
    from collections import Counter

    assert (
        udp.describeCounts(Counter({"answered": 3, "rate limited": 2}))
        == "3 answered, 2 rate limited"
    )
    assert udp.describeCounts(Counter()) == "nothing"


# -- the reply's source address --


def test_reply_from_the_ipv6_pktinfo_destination():
    destination = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.2")
    ((level, kind, data),) = udp._replyFrom(
        [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, destination + struct.pack("I", 7))]
    )
    assert (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)
    assert data == destination + struct.pack("I", 0)


def test_reply_from_the_ipv4_pktinfo_destination():
    info = struct.pack("i", 3) + socket.inet_aton("127.0.0.9") + socket.inet_aton("127.0.0.2")
    ((level, kind, data),) = udp._replyFrom([(socket.IPPROTO_IP, udp.IP_PKTINFO, info)])
    assert data == struct.pack("i", 0) + socket.inet_aton("127.0.0.2") + b"\0\0\0\0"


def test_summary_by_source_busiest_first_and_bounded():
    s, _ = server("sink")
    for i in range(30):
        for _ in range(i + 1):
            s.handle(b"x", f"192.0.2.{i}", 40000)
    s.handle(b"x", "192.0.2.1", 7)
    summary = s.takeSummary()
    assert len(summary) == udp.SUMMARY_SOURCES + 1
    assert summary[0] == ("192.0.2.29", {"no reply": 30})
    assert summary[-1][0] == "other sources"
    assert sum(sum(c.values()) for _, c in summary) == sum(range(1, 31)) + 1
    assert s.takeSummary() == []


def test_counted_sources_are_bounded():
    s, _ = server("sink", rate=0)
    for i in range(udp.COUNTED_SOURCES + 500):
        s.handle(b"x", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 40000)
    assert len(s.bySource) == udp.COUNTED_SOURCES + 1
    assert s.bySource["other sources"] == {"no reply": 500}
