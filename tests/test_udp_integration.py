"""UDP with real processes: `twist sockets --listen SERVICE@udp:0` on loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
from conftest import TWIST, WAIT, refusingPort, startServer, twistsock

SERVICES = ("echo", "upper", "sink", "ack")


@pytest.fixture(scope="module")
def server():
    """Every service on a dual-stack UDP port ("::"), summaries every second."""
    args = ["--udp-summary-interval", "1"]
    for name in SERVICES:
        args += ["--listen", f"{name}@udp:0"]
    server = startServer(*args)
    yield server
    server.stop()
    assert "Traceback" not in "\n".join(server.lines)


def port(server, name) -> int:
    return server.service(name).port


def exchange(destination: tuple, data: bytes, *, family=socket.AF_INET) -> bytes:
    """
    Send from a connected socket (which drops replies from any other address)
    and wait for one reply.
    """
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.connect(destination)
        s.send(data)
        return s.recv(70000)


def sender(destination: tuple, bind: tuple = ("127.0.0.1", 0)) -> socket.socket:
    """A UDP socket bound to `bind` and connected to `destination` (only its replies reach it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    s.connect(destination)
    s.settimeout(WAIT)
    return s


def waiting(s: socket.socket) -> list[bytes]:
    """
    Every datagram already queued on `s`, without waiting. A refusal (the
    ICMP error of a port nobody listens on) is raised, never taken as no reply.
    """
    s.setblocking(False)
    found = []
    try:
        while True:
            found.append(s.recv(70000))
    except BlockingIOError:
        return found
    finally:
        s.settimeout(WAIT)


def answeredAfter(server, name: str, s: socket.socket) -> None:
    """
    Until the server has handled what `s` sent to service `name`: another
    socket's marker sent after it is echoed back. A port handles its
    datagrams in order and sends each reply before reading the next, so any
    reply to `s` is queued on it by then (loopback delivers at once).
    """
    with sender(("127.0.0.1", port(server, name)), bind=("127.0.0.9", 0)) as marker:
        marker.send(b"marker")
        assert marker.recv(100) == b"marker"


def test_listening_on_the_dual_stack_default(server):
    for name in SERVICES:
        assert server.service(name).address.startswith("[::]:"), server.listening


@pytest.mark.parametrize("size", [1, 1024, 65507])
def test_echo_is_whole_up_to_the_ipv4_maximum(server, size):
    data = os.urandom(size)
    assert exchange(("127.0.0.1", port(server, "echo")), data) == data


def test_echo_of_the_ipv6_maximum(server):
    data = os.urandom(65527)
    assert exchange(("::1", port(server, "echo")), data, family=socket.AF_INET6) == data


def test_upper(server):
    assert exchange(("127.0.0.1", port(server, "upper")), b"hello, udp") == b"HELLO, UDP"


def test_the_reply_leaves_from_the_address_the_request_was_sent_to(server):
    """
    127.0.0.2 is as local as 127.0.0.1; a reply from .1 would be dropped by
    this connected socket.
    """
    assert exchange(("127.0.0.2", port(server, "echo")), b"to .2") == b"to .2"
    with socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as s:  # unconnected: see where it comes from
        s.settimeout(WAIT)
        s.sendto(b"where from?", ("127.0.0.3", port(server, "echo")))
        data, source = s.recvfrom(100)
    assert (data, source) == (b"where from?", ("127.0.0.3", port(server, "echo")))


def test_ipv4_and_ipv6_peers_on_one_port_logged_as_such(server):
    assert (
        exchange(("127.0.0.1", port(server, "ack")), b"from IPv4 over udp\n")
        == b"I got your message"
    )
    assert (
        exchange(("::1", port(server, "ack")), b"from IPv6 over udp\n", family=socket.AF_INET6)
        == b"I got your message"
    )
    (v4,) = server.waitFor(r"Here is the message: from IPv4 over udp$")
    (v6,) = server.waitFor(r"Here is the message: from IPv6 over udp$")
    assert "] 127.0.0.1:" in v4 and "::ffff:" not in v4
    assert "] [::1]:" in v6


def test_no_amplification(server):
    with sender(("127.0.0.1", port(server, "ack"))) as s:
        s.send(b"x")
        s.send(b"long enough to be acked")
        # Handled in order: had the short one been answered, its reply would be queued first.
        assert s.recv(100) == b"I got your message"
        assert waiting(s) == []
    server.waitFor(r"ack udp \[::\]:\d+ from 127\.0\.0\.1: .*reply larger than request")


def test_reflecting_source_ports_are_never_answered(server):
    sources = [11211, 1900]  # memcached, SSDP: unprivileged, so no root needed
    if os.geteuid() == 0:
        sources.append(7)
    for source in sources:
        with sender(("127.0.0.1", port(server, "echo")), bind=("127.0.0.1", source)) as s:
            s.send(b"loop?")
            answeredAfter(server, "echo", s)
            assert waiting(s) == [], source
    server.waitFor(r"echo udp \[::\]:\d+ from 127\.0\.0\.1: .*blocked source port")


def test_sink_logs_and_answers_nothing(server):
    with sender(("127.0.0.1", port(server, "sink"))) as s:
        s.send(b"Half a league over udp")
        server.waitFor(r"\] 127\.0\.0\.1:\d+ -->Half a league over udp$")
        # The summary comes from a later turn of the server's loop than the datagram's handling.
        server.waitFor(r"sink udp \[::\]:\d+ from 127\.0\.0\.1: .*no reply")
        assert waiting(s) == []


def test_rate_limit_holds_with_real_sockets():
    # A rate this low refills nothing while the test runs: exactly the burst is answered.
    server = startServer(
        "--udp-rate", "0.001", "--udp-burst", "5", "--listen", "udp:0:interface=127.0.0.1"
    )
    try:
        with sender(("127.0.0.1", server.service("echo").port)) as s:
            for i in range(20):
                s.send(b"%d" % i)
            # Another source (its own bucket) is answered once all twenty were handled.
            answeredAfter(server, "echo", s)
            replies = waiting(s)
        assert replies == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        server.stop()
    assert any(
        re.search(
            r"echo udp 127\.0\.0\.1:\d+ from 127\.0\.0\.1: 5 answered, 15 rate limited$", line
        )
        for line in server.lines
    ), server.lines[-5:]


# -- the client --


def test_udp_client_command(server):
    p = port(server, "upper")
    for target in (
        ["127.0.0.1", str(p)],
        [f"udp:127.0.0.2:{p}"],
        [f"udp:[::1]:{p}"],
        ["localhost", str(p)],
    ):
        result = twistsock("udp", *target, "hello")
        assert (result.returncode, result.stdout) == (0, b"FROM SERVER: HELLO\n"), result.stderr


def test_udp_client_says_where_it_sends_with_verbose(server):
    p = port(server, "echo")
    result = twistsock("udp", "-v", f"udp:[::1]:{p}", "hi")
    assert (result.returncode, result.stdout) == (0, b"FROM SERVER: hi\n"), result.stderr
    first, last = result.stderr.decode().splitlines()
    assert first.startswith(f"twistsock: sending to [::1]:{p} from [::1]:"), first
    assert last.endswith(" s in all")


def test_udp_client_errors(server):
    timeout = twistsock(
        "udp",
        "--timeout",
        "0.6",
        "--retries",
        "2",
        "127.0.0.1",
        str(port(server, "sink")),
        "nobody answers",
    )
    assert timeout.returncode == 4
    assert b": timed out after 0.6 s: no reply (sink never answers" in timeout.stderr
    server.waitFor(r"-->nobody answers$", count=3)  # the first try and two retries
    with refusingPort(socket.SOCK_DGRAM) as unused:
        refused = twistsock("udp", "127.0.0.1", str(unused), "x")
    assert (refused.returncode, refused.stderr) == (
        3,
        f"twistsock: 127.0.0.1 port {unused}: connection refused\n".encode(),
    )


def test_udp_port_in_use_is_one_line_and_status_1():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        result = subprocess.run(
            [TWIST, "sockets", "--listen", f"udp:{busy}:interface=127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert result.returncode == 1
    assert (
        result.stderr
        == f"twistsock: error: cannot listen on udp:{busy}:interface=127.0.0.1 (echo): "
        "Address already in use\n"
    )
