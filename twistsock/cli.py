"""
The C{twistsock} command: argument parsing and output over L{twistsock.client}.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast

from twisted.internet import defer, task

from . import __version__, client
from . import certs as certsModule
from ._format import isIPv6Literal

#: Exit statuses, as documented in docs/clients.md and in --help.
EXIT_STATUSES = {
    0: "success",
    1: "connection failed or lost",
    2: "unknown host",
    3: "connection refused",
    4: "timeout",
    5: "echo mismatch",
    6: "TLS: the server's certificate is not trusted or not for this host",
    7: "TLS handshake failed (e.g. the server refused our certificate)",
    8: "the server answered with an error (e.g. a line over its limit)",
    64: "usage error",
    130: "interrupted (SIGINT or SIGTERM)",
}

_EPILOG = (
    "TARGET is a Twisted client endpoint string (tcp:127.0.0.1:5000, "
    "unix:path=/tmp/echo.sock, tls:localhost:3443, tls:[::1]:3443; udp:HOST:PORT "
    "for the udp command) or HOST PORT, "
    "where HOST may be a name or an IPv4 or IPv6 literal (::1). tls: targets "
    "verify the server's certificate and name.\n\nexit statuses:\n"
    + "\n".join(f"  {status:>3}  {meaning}" for status, meaning in EXIT_STATUSES.items())
)

_T = TypeVar("_T")

# An endpoint string starts with its type name and a colon: "tcp:", "unix:".
_ENDPOINT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*:")


class _Parser(argparse.ArgumentParser):
    """
    Usage errors are one line and exit with 64 (EX_USAGE, as `twist` does),
    not 2: 2 is "unknown host".
    """

    def error(self, message: str) -> NoReturn:
        self.exit(64, f"{self.prog}: error: {message} ({self.prog} --help shows the usage)\n")


def _parse(argv: Sequence[str] | None) -> tuple[_Parser, argparse.Namespace]:
    """
    Parse, letting options come after TARGET and MESSAGE (twistsock echo HOST
    PORT --size 250).
    """
    parser, commands = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands.choices:
        sub = commands.choices[argv[0]]
        args = sub.parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return sub, args
    return parser, parser.parse_args(argv)


def _parser() -> tuple[_Parser, argparse._SubParsersAction]:
    parser = _Parser(
        prog="twistsock",
        description="Clients for the twistsock services.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"twistsock {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(name: str, help: str, rest: str, tls: bool = True) -> argparse.ArgumentParser:
        tail = f" [{rest}]" if rest else ""
        usage = (
            f"twistsock {name} [options] TARGET{tail}\n"
            f"       twistsock {name} [options] HOST PORT{tail}"
        )
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            usage=usage,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "words",
            nargs="+",
            metavar=f"TARGET{tail}",
            help=f"where to connect, then the {rest.lower()} (default: read from standard input)"
            if rest
            else "where to connect",
        )
        versions = sub.add_mutually_exclusive_group()
        versions.add_argument(
            "-4",
            dest="family",
            action="store_const",
            const=socket.AF_INET,
            default=0,
            help="IPv4 only",
        )
        versions.add_argument(
            "-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only"
        )
        sub.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="say on standard error where it sends from and to, and how long it took"
            if name == "udp"
            else "say on standard error where it connects, the TLS it gets, and how long it took",
        )
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=client.DEFAULT_TIMEOUT,
            help=(
                "seconds the whole exchange may take; streaming standard input, connecting only "
                "(default: %(default)g)"
            ),
        )
        if tls:
            sub.add_argument(
                "--ca",
                metavar="FILE",
                help=(
                    "tls: trust the CA certificates in FILE (e.g. certs/ca.pem) instead of the "
                    "system's"
                ),
            )
            sub.add_argument(
                "--cert",
                metavar="FILE",
                help="tls: present the client key and certificate in FILE (e.g. certs/client.pem)",
            )
        return sub

    command(
        "send",
        "Send a message, then close (like streamwrite). Without MESSAGE, stream "
        "standard input and wait until the server has read it all and closed.",
        "MESSAGE",
    )
    echo = command(
        "echo",
        "Send data, read it all back and compare (the classic TCP echo client). "
        "Without MESSAGE, stream standard input and write the echo to standard output as it comes.",
        "MESSAGE",
    )
    echo.add_argument(
        "--size",
        type=_size,
        help="send N random bytes instead of a message, at most 64 MiB (the classic echo "
        "client sends 250)",
    )
    command(
        "upper",
        "Send a line, print the upper-cased reply (the Java TCPClient). Without LINE, send "
        "every line of standard input and print every reply (a server started with "
        "--keep-open answers them all).",
        "LINE",
    )
    command(
        "raw",
        "An interactive session with any service, like nc HOST PORT: standard input to the "
        "server, its replies to standard output; the end of input half-closes, and it ends "
        "when the server closes.",
        "",
    )
    command(
        "ack",
        "Send a message, print the acknowledgement (the sockets tutorial's client.c).",
        "MESSAGE",
    )
    datagram = command(
        "udp",
        "Send a datagram, print the reply (the classic UDP client). TARGET is udp:HOST:PORT or "
        "HOST PORT.",
        "MESSAGE",
        tls=False,
    )
    datagram.add_argument(
        "--retries",
        type=_size,
        default=client.DEFAULT_RETRIES,
        help=(
            "send again this many times, evenly within --timeout, while no reply has come "
            "(default: %(default)s)"
        ),
    )
    datagram.add_argument(
        "--no-reply",
        action="store_true",
        help=(
            "send the datagram once and exit 0 without waiting for a reply (for sink, which never "
            "answers)"
        ),
    )
    certs = commands.add_parser(
        "certs",
        help="Make a local CA, a server and a client certificate.",
        description=(
            "Make a local CA (ca.pem), a server key and certificate (server.pem) and a client key "
            "and certificate (client.pem). The CA's key signs the two and is never written: "
            "renewing means making all three again (--force)."
        ),
    )
    certs.add_argument(
        "directory",
        nargs="?",
        default="certs",
        metavar="DIR",
        help="where to write ca.pem, server.pem, client.pem (default: certs)",
    )  # no %(default)s: parse_intermixed_args hides positional defaults from --help
    certs.add_argument(
        "--name",
        action="append",
        default=[],
        type=_certName,
        help="another DNS name or IP address for the server certificate; repeatable",
    )
    certs.add_argument(
        "--days",
        type=_days,
        default=certsModule.VALID_DAYS,
        help=(
            f"how long the server and client certificates are valid, 1 to {certsModule.MAX_DAYS} "
            "(default: %(default)s; 90 for the modern TLS profile)"
        ),
    )
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace existing files (this is also how to renew them: a new CA each time)",
    )
    completion = commands.add_parser(
        "completion",
        help="Print a shell completion script.",
        description=(
            'Print a completion script for the shell: eval "$(twistsock completion bash)" in '
            "~/.bashrc, or twistsock completion zsh in a zsh fpath file."
        ),
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="bash or zsh")
    return parser, commands


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {'whole ' if kind is int else ''}number"
        ) from None


def _seconds(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


#: The most random bytes C{echo --size} makes: they are held in memory, twice (sent and expected).
MAX_SIZE = 64 << 20


def _size(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_SIZE} (64 MiB, held in memory); for more, stream: "
            f"head -c {value} /dev/urandom | twistsock echo HOST PORT > /dev/null"
        )
    return value


def _certName(text: str) -> str:
    try:
        return certsModule.hostName(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _days(text: str) -> int:
    value = int(_number(text, int))
    if not 1 <= value <= certsModule.MAX_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be from 1 to {certsModule.MAX_DAYS} (Mozilla's intermediate profile allows "
            "less than 366)"
        )
    return value


def splitTarget(words: Sequence[str]) -> tuple[str | tuple[str, int], list[str]]:
    """
    Split C{TARGET [MESSAGE...]} or C{HOST PORT [MESSAGE...]}.

    @raise ValueError: no usable target.
    """
    first, rest = words[0], list(words[1:])
    joined = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]*)\]:(\d+)|([A-Za-z0-9.-]+):(\d+)", first)
    if joined and (joined.group(3) or "").lower() not in ("tcp", "ssl", "tls", "unix", "udp"):
        # HOST:PORT or [HOST6]:PORT in one word, as in URLs
        host, port = (
            (joined.group(1), joined.group(2))
            if joined.group(1) is not None
            else (joined.group(3), joined.group(4))
        )
        raise ValueError(
            f"{first!r}: give HOST and PORT as two words ({host} {port}) or an endpoint "
            f"string (tcp:{first})"
        )
    if _ENDPOINT_TYPE.match(first) and not isIPv6Literal(first):
        return first, rest
    if not rest:
        raise ValueError(
            f"{first!r} is neither an endpoint string (tcp:HOST:PORT) nor followed by a PORT"
        )
    try:
        port = int(rest[0])
    except ValueError:
        raise ValueError(f"PORT must be a number, not {rest[0]!r}") from None
    return (first, port), rest[1:]


def _message(words: list[str]) -> bytes | None:
    """The message words as bytes, joined by spaces as echo(1) does, or None."""
    return os.fsencode(" ".join(words)) if words else None


def main(argv: Sequence[str] | None = None) -> None:
    """Run C{twistsock}; exits with one of L{EXIT_STATUSES}."""
    _reopenClosedStandardStreams()
    parser, args = _parse(argv)
    if args.command == "certs":
        _certs(args)
        return
    if args.command == "completion":
        sys.stdout.write(completionScript(args.shell))
        return
    previous = signal.signal(
        signal.SIGTERM, _interrupt
    )  # while standard input is read, before the reactor runs
    try:
        target, words = splitTarget(args.words)
        # A malformed target or certificate file is a usage error, before anything runs.
        if args.command == "udp":
            client.udpTarget(target)
        else:
            client.endpoint(target, ca=args.ca, cert=args.cert, family=args.family)
        run = _COMMANDS[args.command](args, target, _message(words))
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        sys.stderr.write("\ntwistsock: interrupted\n")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.verbose:
        _verbose()
    task.react(_react, (run, parser))


def _verbose() -> None:
    """
    Show the client's debug events (connections, TLS) on standard error, one
    line each, and the time at the end.
    """
    import atexit
    import time

    from twisted.logger import ILogObserver, formatEvent, globalLogBeginner

    started = time.monotonic()

    def show(event: dict) -> None:
        if event.get("log_namespace") == "twistsock.client":
            sys.stderr.write(f"twistsock: {formatEvent(event)}\n")
            sys.stderr.flush()

    # Any callable is an observer, though Twisted annotates them as ILogObserver.
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, show)], discardBuffer=True, redirectStandardIO=False
    )
    atexit.register(
        lambda: sys.stderr.write(f"twistsock: {time.monotonic() - started:.3f} s in all\n")
    )


def _reopenClosedStandardStreams() -> None:
    """
    Started with standard input or output closed (C{<&-}, C{>&-}): /dev/null in
    their place, so they read as empty and swallow output.
    """
    for fd, mode, name in ((0, os.O_RDONLY, "stdin"), (1, os.O_WRONLY, "stdout")):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, mode)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt


def completionScript(shell: str) -> str:
    """
    A bash (or zsh, through bashcompinit) completion script for the commands
    and their options.
    """
    _, commands = _parser()
    cases = []
    for name, sub in commands.choices.items():
        options = sorted(o for action in sub._actions for o in action.option_strings)
        choices = [
            c
            for action in sub._actions
            if not action.option_strings and action.choices
            for c in action.choices
        ]
        cases.append(f'        {name}) words="{" ".join(options + choices)}" ;;')
    body = "\n".join(cases)
    script = f"""_twistsock() {{
    local current=${{COMP_WORDS[COMP_CWORD]}} words
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(commands.choices)} --help --version" -- "$current"))
        return
    fi
    case ${{COMP_WORDS[1]}} in
{body}
    esac
    case ${{COMP_WORDS[COMP_CWORD-1]}} in
        --ca|--cert) COMPREPLY=($(compgen -f -- "$current")); return ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$current"))
}}
complete -o default -F _twistsock twistsock
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _certs(args: argparse.Namespace) -> None:
    try:
        made = certsModule.generate(args.directory, args.name, force=args.force, days=args.days)
    except (certsModule.CertificatesExist, ValueError, OSError) as e:
        sys.stderr.write(f"twistsock: {e}\n")
        raise SystemExit(1) from None
    print(f"{made.ca}: the local CA certificate (trust it with --ca)")
    print(
        f"{made.server}: server key and certificate for {', '.join(made.names)}, valid "
        f"{args.days} day{'s' if args.days != 1 else ''}"
    )
    print(f"{made.client}: client key and certificate for mutual TLS (present it with --cert)")


def _react(
    reactor, run: Callable[[object], defer.Deferred[None]], parser: _Parser
) -> defer.Deferred[None]:
    finished: list[bool] = []
    interrupted: list[bool] = []
    exchange = defer.maybeDeferred(run, reactor)

    def finish(result: _T) -> _T:
        finished.append(True)
        return result

    exchange.addBoth(finish)

    def shutdown() -> None:
        # SIGINT or SIGTERM stops the reactor: end the exchange, wherever it is.
        if not finished:
            interrupted.append(True)
            exchange.cancel()

    def failed(reason):
        if interrupted:
            sys.stderr.write("twistsock: interrupted\n")
            raise SystemExit(130)
        if reason.check(
            ValueError, TypeError
        ):  # what the target or message turned out to be (a datagram too large for IPv4)
            parser.error(str(reason.value))
        reason.trap(client.ClientError)
        sys.stderr.write(f"twistsock: {reason.value}\n")
        raise SystemExit(reason.value.exitStatus)

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    return exchange.addErrback(failed)


def _out(*parts: bytes) -> None:
    try:
        sys.stdout.buffer.write(b"".join(parts) + b"\n")
        sys.stdout.buffer.flush()
    except OSError as e:  # a full disk, a closed pipe: one line, status 1
        raise client.ClientError(
            f"cannot write the reply to standard output: {e.strerror or e}"
        ) from None


def _streamOptions(args: argparse.Namespace) -> dict[str, Any]:
    """The options every stream client function takes, from the command line."""
    return {"timeout": args.timeout, "ca": args.ca, "cert": args.cert, "family": args.family}


def _stream(args, target, mode: str):
    """Standard input to the connection, the replies to standard output, as they come."""
    return lambda reactor: client.relay(
        target,
        mode,
        **_streamOptions(args),
        reactor=reactor,
    ).addCallback(lambda result: None)


def _send(args, target, message):
    if message is None:
        return _stream(args, target, "send")
    return lambda reactor: client.send(
        target,
        message,
        **_streamOptions(args),
        reactor=reactor,
    )


def _raw(args, target, message):
    if message is not None:
        raise ValueError("raw takes no MESSAGE: it sends standard input")
    return _stream(args, target, "raw")


def _echo(args, target, message):
    if args.size is not None:
        if message is not None:
            raise ValueError("give either a MESSAGE or --size, not both")
        data = os.urandom(args.size)

        def show(echoed: bytes) -> None:
            _out(b"Received: %d bytes, identical to those sent" % len(echoed))

    elif message is None:
        return _stream(args, target, "echo")
    else:
        data = message

        def show(echoed: bytes) -> None:
            _out(b"Received: ", echoed)

    return lambda reactor: client.echo(
        target,
        data,
        **_streamOptions(args),
        reactor=reactor,
    ).addCallback(show)


def _upper(args, target, message):
    if message is None:
        return _stream(args, target, "upper")
    line = message.rstrip(b"\r\n")
    if b"\n" in line:
        raise ValueError("LINE must be one line")
    return lambda reactor: client.upper(
        target,
        line,
        **_streamOptions(args),
        reactor=reactor,
    ).addCallback(lambda reply: _out(b"FROM SERVER: ", reply))


def _ack(args, target, message):
    if message is None:
        if sys.stdin.isatty():
            sys.stdout.write("Please enter the message: ")
            sys.stdout.flush()
        message = sys.stdin.buffer.readline()
    message = message.rstrip(b"\r\n")
    if b"\n" in message:
        raise ValueError("MESSAGE must be one line")
    return lambda reactor: client.ack(
        target,
        message,
        **_streamOptions(args),
        reactor=reactor,
    ).addCallback(_out)


def _udp(args, target, message):
    data = message if message is not None else sys.stdin.buffer.read(client.MAX_DATAGRAM6 + 1)
    if args.no_reply:
        return lambda reactor: client.udp(
            target, data, timeout=args.timeout, reply=False, family=args.family, reactor=reactor
        )
    return lambda reactor: client.udp(
        target,
        data,
        timeout=args.timeout,
        retries=args.retries,
        family=args.family,
        reactor=reactor,
    ).addCallback(lambda reply: _out(b"FROM SERVER: ", reply))


_COMMANDS = {"send": _send, "echo": _echo, "upper": _upper, "ack": _ack, "udp": _udp, "raw": _raw}
