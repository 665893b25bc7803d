"""--listen parsing, the twist sockets options, and the listening services."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from twistsock.listen import ListenFailed, ListeningService, ListenSpec, SocketsService, parseListen
from twistsock.services import ServiceConfig, ServiceFactory
from twistsock.tap import Options, makeService


@pytest.mark.parametrize(
    "text, service, endpoint",
    [
        ("tcp:5000", "echo", "tcp:5000"),
        ("upper@tcp:6789", "upper", "tcp:6789"),
        ("sink@unix:/tmp/sink.sock", "sink", "unix:/tmp/sink.sock"),
        # Only an "@" before the first ":" names a service.
        ("unix:/tmp/a@b.sock", "echo", "unix:/tmp/a@b.sock"),
        ("ack@unix:/tmp/a@b.sock", "ack", "unix:/tmp/a@b.sock"),
        ("echo@tcp6:5000:interface=\\:\\:1", "echo", "tcp6:5000:interface=\\:\\:1"),
    ],
)
def test_parse_listen(text, service, endpoint):
    assert parseListen(text) == ListenSpec(service, endpoint)


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosuch@tcp:5000", "unknown service 'nosuch'"),
        ("upper@", "no endpoint"),
        ("tcp:notaport", "bad endpoint 'tcp:notaport'"),
        ("bogus:5000", "bad endpoint 'bogus:5000'"),
        ("tcp:5000:interface=::", "bad endpoint"),
        ("ssl:5443:privateKey=/nonexistent/key.pem", "bad endpoint"),
        ("tcp:5000:foo=bar", r"tcp: no parameter 'foo'$"),
        ("tcp6:5000:interface=::1", r"interface given more than once \(a colon in a value"),
        ("unix:x.sock:mode=999", r"unix: mode is octal digits, as in mode=660$"),
    ],
)
def test_parse_listen_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parseListen(text)


def test_options_default_is_echo_on_5000():
    options = Options()
    options.parseOptions([])
    assert options["listen"] == [ListenSpec("echo", "tcp:5000")]
    assert options["max-line"] == 65536
    assert not options["keep-open"]


def test_options_repeatable_listen_and_settings():
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0", "--listen=upper@tcp:0", "--keep-open", "--max-line", "100"]
    )
    assert options["listen"] == [ListenSpec("echo", "tcp:0"), ListenSpec("upper", "tcp:0")]
    assert options["keep-open"]
    assert options["max-line"] == 100


@pytest.mark.parametrize(
    "argv",
    [["--listen", "nosuch@tcp:0"], ["--listen", "tcp:x"], ["--max-line", "0"], ["--max-line", "x"]],
)
def test_options_errors_are_one_line_and_status_1(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(argv)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("twistsock: error: ") and err.count("\n") == 1


def test_make_service_one_child_per_listen():
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0", "--listen", "sink@unix:/tmp/x.sock", "--max-line", "10"]
    )
    root = makeService(options)
    children = list(root)
    assert [str(c.spec) for c in children] == ["echo@tcp:0", "sink@unix:/tmp/x.sock"]
    assert children[0].factory.service.config == ServiceConfig(maxLine=10, keepOpen=False)
    assert children[0].factory.transport.name == "tcp"
    assert children[1].factory.transport.name == "unix"


class FakeEndpoint:
    """An endpoint whose listen() result the test controls."""

    def __init__(self, result):
        self.result = result
        self.listened = []

    def listen(self, factory):
        self.listened.append(factory)
        return self.result


class FakePort:
    stopped = False

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 43210)

    def stopListening(self):
        self.stopped = True


def listening(result, failures=None):
    return ListeningService(
        ListenSpec("echo", "tcp:0"),
        FakeEndpoint(result),
        ServiceFactory("echo"),
        (failures if failures is not None else []).append,
    )


def test_listening_service_logs_real_address_and_stops():
    from twisted.internet.testing import EventLoggingObserver
    from twisted.logger import formatEvent, globalLogPublisher

    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        port = FakePort()
        service = listening(defer.succeed(port))
        service.startService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [formatEvent(e) for e in observer] == ["echo listening on 127.0.0.1:43210 (tcp:0)"]
    service.stopService()
    assert port.stopped


def test_listening_service_synchronous_failure_raises_one_line():
    error = CannotListenError("", 5000, OSError(98, "Address already in use"))
    service = listening(defer.fail(error))
    with pytest.raises(
        ListenFailed, match=r"^cannot listen on tcp:0 \(echo\): Address already in use$"
    ):
        service.privilegedStartService()


def test_listening_service_later_failure_is_reported():
    waiting: defer.Deferred = defer.Deferred()
    failures: list[str] = []
    service = listening(waiting, failures)
    service.startService()
    assert failures == []
    waiting.errback(CannotListenError("", 5000, OSError(13, "Permission denied")))
    assert failures == ["cannot listen on tcp:0 (echo): Permission denied"]


def test_sockets_service_closes_the_others_and_exits_1(capsys):
    first = FakePort()
    root = SocketsService(MemoryReactorClock())
    listening(defer.succeed(first)).setServiceParent(root)
    listening(
        defer.fail(CannotListenError("", 1, OSError(98, "Address already in use")))
    ).setServiceParent(root)
    with pytest.raises(SystemExit) as exited:
        root.startService()
    assert exited.value.code == 1
    assert first.stopped
    assert (
        capsys.readouterr().err
        == "twistsock: error: cannot listen on tcp:0 (echo): Address already in use\n"
    )


def test_sockets_service_logs_ready_once_the_reactor_turns():
    reactor = MemoryReactorClock()
    root = SocketsService(reactor)
    listening(defer.succeed(FakePort())).setServiceParent(root)
    root.startService()
    assert [f for f, _, _ in reactor.whenRunningHooks] == [reactor.callLater]


def test_a_later_listen_failure_stops_the_reactor_and_exits_1():
    from twistsock.listen import _exitNow

    reactor = MemoryReactorClock()
    reactor.running = True
    root = SocketsService(reactor)
    root.fail("cannot listen on x:1 (echo): Permission denied")
    assert reactor.hasStopped
    assert reactor.triggers["after"]["shutdown"] == [(_exitNow, (1,), {})]


@pytest.mark.parametrize(
    "text, hint",
    [
        ("haproxy:tcp:5000", "use proxy:tcp:5000"),
        ("HAProxy:tcp:5000", "use proxy:tcp:5000"),
        ("upper@proxy:HAPROXY:tcp:5000", "use proxy:tcp:5000"),
        ("proxy:proxy:tcp:5000", "one PROXY header per connection: use proxy:tcp:5000"),
    ],
)
def test_twisteds_haproxy_and_a_double_proxy_are_refused_in_any_case(text, hint):
    with pytest.raises(ValueError, match=hint):
        parseListen(text)


@pytest.mark.parametrize(
    "option",
    [
        "--idle-timeout",
        "--line-timeout",
        "--proxy-header-timeout",
        "--drain-timeout",
        "--tls-handshake-timeout",
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-inf"])
def test_timeouts_must_be_finite(option, value):
    from twistsock.tap import ConfigurationError, Options

    with pytest.raises(ConfigurationError) as raised:
        Options().parseOptions([option, value])
    assert "not a finite number" in raised.value.message


def test_workers_are_bounded():
    from twistsock.tap import MAX_WORKERS, ConfigurationError, Options

    with pytest.raises(ConfigurationError) as raised:
        Options().parseOptions(["--workers", "100000"])
    assert f"--workers must be from 0 to {MAX_WORKERS}" in raised.value.message


def test_help_shows_no_internal_option():
    import subprocess

    from conftest import TWIST, WAIT

    shown = subprocess.run(
        [TWIST, "sockets", "--help"], capture_output=True, text=True, timeout=WAIT
    ).stdout
    assert "--workers=" in shown and "--worker=" not in shown and "INDEX:FD" not in shown


@pytest.mark.parametrize("text", ["tcp:notaport", "ssl:port=abc:privateKey=k.pem", "tcp:-1"])
def test_a_port_that_is_not_a_number_says_so(text):
    with pytest.raises(ValueError, match="is not a number"):
        parseListen(text)
