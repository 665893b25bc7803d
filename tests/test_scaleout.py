"""
Beyond one machine: HAProxy in front of two twistsock instances with the
PROXY protocol. One instance is killed during a run of clients: the clients
go on being served by the other, and both logs carry the real client address.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from conftest import WAIT, freePort, requireTool, startServer, twistsock
from test_haproxy import waitForPort
from test_operations import metric, scrape

CLIENT = "127.0.0.5"


def test_clients_keep_being_served_when_an_instance_dies(tmp_path):
    haproxy = requireTool("haproxy")
    a = startServer("--listen", "echo@proxy:tcp:0:interface=127.0.0.1")
    b = startServer("--listen", "echo@proxy:tcp:0:interface=127.0.0.1")
    front = freePort()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 30s\n    timeout server 30s\n"
        "    retries 3\n    option redispatch\n"
        f"frontend fe\n    bind 127.0.0.1:{front}\n    default_backend be\n"
        "backend be\n    balance roundrobin\n"
        f"    server a 127.0.0.1:{a.service('echo').port} send-proxy-v2"
        " check inter 200ms fall 1 rise 2\n"
        f"    server b 127.0.0.1:{b.service('echo').port} send-proxy-v2"
        " check inter 200ms fall 1 rise 2\n"
    )
    proxy = subprocess.Popen(
        [haproxy, "-f", str(config), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    results = []
    try:
        waitForPort(front, proxy)
        for i in range(60):
            if i == 20:
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(WAIT)
            result = twistsock("echo", f"tcp:127.0.0.1:{front}:bindAddress={CLIENT}", f"client {i}")
            results.append((i, result.returncode, result.stderr))
    finally:
        proxy.terminate()
        proxy.wait(WAIT)
        proxy.stdout.close()
        a.stop()
        b.stop()
    assert [r for r in results if r[1] != 0] == []
    record = rf"echo proxy 127\.0\.0\.5:\d+ -> 127\.0\.0\.1:{front}: peer closed"
    servedByA = [line for line in a.lines if re.search(record, line)]
    servedByB = [line for line in b.lines if re.search(record, line)]
    assert 5 <= len(servedByA) <= 20, "roundrobin sent A about half of the first 20"
    assert len(servedByA) + len(servedByB) == 60
    assert len(servedByB) >= 40, "after the kill, B served everyone"


@pytest.mark.parametrize(
    "service, option",
    [
        ("echo", "send-proxy-v2"),  # a LOCAL header, then a reset
        ("echo", "send-proxy"),  # a TCP4 header naming HAProxy's own end, then a reset
        ("sink", "send-proxy-v2"),  # sink says nothing for a check ("Ending connection")
    ],
)
def test_haproxy_health_checks_are_counted_and_leave_no_record(tmp_path, service, option):
    """HAProxy's checks are the proxy's own connections, not clients: counted, never logged."""
    haproxy = requireTool("haproxy")
    server = startServer(
        "--listen",
        f"{service}@proxy:tcp:0:interface=127.0.0.1",
        "--metrics",
        "tcp:0:interface=127.0.0.1",
    )
    front = freePort()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 30s\n    timeout server 30s\n"
        f"frontend fe\n    bind 127.0.0.1:{front}\n    default_backend be\n"
        f"backend be\n    server a 127.0.0.1:{server.service(service).port} {option}"
        " check inter 100ms\n"
    )
    proxy = subprocess.Popen(
        [haproxy, "-f", str(config), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics = server.service("metrics").port
    try:
        # No waitForPort(front): its connection would be a (silent) client of its own. HAProxy
        # binds its frontend before it starts checking, so five checks mean it is ready.
        checks = 0
        for _ in range(int(WAIT / 0.1)):  # until HAProxy has checked five times (bounded)
            tallies = scrape(metrics)[1]
            checks = metric(
                tallies, "twistsock_connections_total", service=service, transport="proxy"
            )
            if checks >= 5:
                break
            time.sleep(0.1)
        target = f"tcp:127.0.0.1:{front}:bindAddress={CLIENT}"
        if service == "echo":
            result = twistsock("echo", target, "hi")
        else:
            result = twistsock("send", target, input=b"hi\n")
        server.waitFor(rf"{service} proxy {re.escape(CLIENT)}:\d+ -> ")
    finally:
        proxy.terminate()
        proxy.wait(WAIT)
        proxy.stdout.close()
        server.stop()
    assert checks >= 5, "HAProxy's checks reached the server and were counted"
    assert result.returncode == 0, result.stderr
    records = [line for line in server.lines if f"{service} proxy " in line]
    assert len(records) == 1 and CLIENT in records[0], records
    if service == "sink":
        endings = [line for line in server.lines if "Ending connection" in line]
        assert len(endings) == 1 and CLIENT in endings[0], endings
