"""
The log cannot hurt the server (twistsock.logs): a reader that stops reading,
log rotation and signals, bounded volume, one JSON object per line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

from conftest import TWIST, WAIT, freePort, startServer, twistsock

from twistsock.logs import LineObserver, LogOutput


def writeInThread(output: LogOutput, lines: list[bytes]) -> None:
    """
    Write from another thread, so that a write that blocked fails the test
    instead of hanging it.
    """
    writer = threading.Thread(target=lambda: [output.write(line) for line in lines])
    writer.start()
    writer.join(WAIT)
    assert not writer.is_alive(), "LogOutput.write blocked"


def readAll(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_reader_that_stops_reading_never_blocks_the_writer_and_drops_are_counted():
    r, w = os.pipe()
    # The reader has stopped: the pipe is full before the first line, so that the log
    # thread blocks on its first write however fast the writer is (a slow writer, e.g.
    # under coverage, let the thread write between its lines: drops in several bursts).
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\n" * 65536)
    except BlockingIOError:
        os.set_blocking(w, True)
    stream = os.fdopen(w, "w")
    output = LogOutput(stream, limit=16384)
    lines = [
        b"%05d %s\n" % (i, b"x" * 90) for i in range(5000)
    ]  # 480 KiB: far more than pipe and buffer
    writeInThread(output, lines)
    assert output.dropped > 4000
    received = []
    reader = threading.Thread(target=lambda: received.append(readAll(r)))
    reader.start()
    assert output.flush(WAIT), "the output caught up once read"
    writeInThread(output, [b"after the reader came back\n"])
    assert output.close(WAIT)
    stream.close()
    reader.join(WAIT)
    text = received[0]
    # One summary each time the output caught up (how often depends on when the writer ran):
    # together they count every dropped line, and the last comes before the next line logged.
    said = b" log lines dropped: the log output did not keep up"
    summaries = [line for line in text.splitlines() if line.endswith(said)]
    assert summaries and sum(int(line.split()[0]) for line in summaries) == output.dropped
    assert text.endswith(summaries[-1] + b"\nafter the reader came back\n")
    kept = [line for line in text.splitlines() if line[:5].isdigit()]
    assert kept == [line.rstrip(b"\n") for line in lines[: len(kept)]], (
        "what was kept is whole and in order"
    )
    assert len(kept) + output.dropped == 5000


def spyOnWrites(monkeypatch) -> list[int]:
    """The size of every os.write from now on."""
    writes: list[int] = []
    real = os.write

    def spy(fd: int, data) -> int:
        writes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", spy)
    return writes


LINES = [b"%d %s\n" % (i, b"y" * 300) for i in range(200)]  # 61 KiB in all


def test_lines_to_a_pipe_are_written_whole_in_writes_of_at_most_4096_bytes(monkeypatch):
    """Workers share one pipe: POSIX keeps writes of PIPE_BUF bytes or less from interleaving."""
    readFd, writeFd = os.pipe()
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(readFd, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with open(writeFd, "w") as stream:
        output = LogOutput(stream)
        writes = spyOnWrites(monkeypatch)
        writeInThread(output, LINES)
        assert output.close(WAIT)
        monkeypatch.undo()
    reader.join(WAIT)
    os.close(readFd)
    assert writes and max(writes) <= 4096
    assert bytes(received).splitlines(keepends=True) == LINES


def test_lines_to_a_regular_file_are_written_in_fewer_bigger_writes(tmp_path, monkeypatch):
    """A regular file is written whole under its lock: no need for PIPE_BUF-sized writes."""
    path = tmp_path / "log"
    assert sum(map(len, LINES)) < 64 * 1024
    with open(path, "w") as stream:
        output = LogOutput(stream)
        writes = spyOnWrites(monkeypatch)
        with output._lock:  # the writing thread waits until every line is queued
            for line in LINES:
                output.write(line)
        assert output.close(WAIT)
        monkeypatch.undo()
    assert writes == [sum(map(len, LINES))]  # one write, not one per 4 KiB
    assert path.read_bytes().splitlines(keepends=True) == LINES


def test_reopen_follows_a_rotated_file(tmp_path):
    path = tmp_path / "twist.log"
    output = LogOutput(open(path, "a"))
    output.write(b"before\n")
    assert output.flush(WAIT)
    path.rename(tmp_path / "twist.log.1")
    assert output.reopen()
    output.write(b"after\n")
    assert output.flush(WAIT)
    path.rename(tmp_path / "twist.log.2")  # logrotate, the next day
    assert output.reopen()
    output.write(b"again\n")
    assert output.close(WAIT)
    assert (tmp_path / "twist.log.1").read_bytes() == b"before\n"
    assert (tmp_path / "twist.log.2").read_bytes() == b"after\n"
    assert path.read_bytes() == b"again\n"


def test_json_lines_are_flat_and_carry_the_fields():
    from twisted.logger import LogLevel

    written: list[bytes] = []

    class Memory:
        def write(self, line: bytes) -> None:
            written.append(line)

    observer = LineObserver(Memory(), "json")  # type: ignore[arg-type]
    observer(
        {
            "log_format": "{record}",
            "record": "echo tcp a -> b: peer closed",
            "log_level": LogLevel.info,
            "log_namespace": "twistsock.connection.Connection",
            "log_time": 0.0,
            "bytes_in": 3,
            "detail": None,
            "log_logger": object(),
            "peer": "a",
        }
    )
    observer(
        {
            "log_format": "{peer} -->{message}",
            "peer": "p",
            "message": "hi",
            "log_level": LogLevel.info,
            "log_namespace": "n",
            "log_time": 0.0,
        }
    )
    first, second = (json.loads(line) for line in written)
    assert first == {
        "time": first["time"],
        "level": "info",
        "namespace": "twistsock.connection.Connection",
        "text": "echo tcp a -> b: peer closed",
        "bytes_in": 3,
        "detail": None,
        "peer": "a",
    }
    assert second["text"] == "p -->hi" and second["message"] == "hi"
    assert all(line.endswith(b"}\n") and line.count(b"\n") == 1 for line in written)


# -- with real processes -------------------------------------------------------


def waitForPort(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the server does not listen")


def upperOnce(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(line + b"\n")
        reply = b""
        while chunk := s.recv(100):
            reply += chunk
        return reply


@contextmanager
def unreadLog(*args: str):
    """
    `twist sockets ARGS` serving upper, its log a pipe that nobody reads until
    the test does; yields (port, process).
    """
    port = freePort()
    process = subprocess.Popen(
        [
            TWIST,
            "--log-format=text",
            "sockets",
            "--log-buffer",
            "65536",
            *args,
            "--listen",
            f"upper@tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        waitForPort(port, process)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_a_server_whose_log_pipe_nobody_reads_serves_2000_connections_and_stops_on_sigterm():
    """
    Before: about 64 KiB of log filled the pipe, write() blocked, clients timed
    out, SIGTERM did nothing.
    """
    with unreadLog() as (port, process):
        for i in range(2000):  # about 300 KiB of records: more than the pipe and the buffer hold
            assert upperOnce(port, b"line %d" % i) == b"LINE %d\n" % i
        process.send_signal(signal.SIGTERM)
        # Still nobody reads: the exit waits for the log a bounded time only.
        assert process.wait(WAIT) == -signal.SIGTERM
        log = process.stdout.read().decode()
    assert "Traceback" not in log
    assert "upper tcp 127.0.0.1:" in log


def test_dropped_lines_are_counted_in_the_log_once_a_reader_returns_and_in_metrics():
    port, metrics = freePort(), freePort()
    process = subprocess.Popen(
        [
            TWIST,
            "--log-format=text",
            "sockets",
            "--log-buffer",
            "65536",
            "--metrics",
            f"tcp:{metrics}:interface=127.0.0.1",
            "--listen",
            f"upper@tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        waitForPort(port, process)
        for _ in range(2000):
            upperOnce(port, b"x")
        from test_operations import metric, scrape

        _, text = scrape(metrics)
        dropped = metric(text, "twistsock_log_lines_dropped_total")
        assert dropped > 0
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(process.stdout.read()))
        reader.start()
        upperOnce(port, b"after")  # the first line that fits brings the count
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == -signal.SIGTERM
        reader.join(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    log = received[0].decode()
    counts = [
        int(line.split("] ", 1)[1].split()[0])
        for line in log.splitlines()
        if "log lines dropped" in line
    ]
    assert counts and sum(counts) >= dropped
    assert log.rstrip().endswith("Main loop terminated."), "every line queued at exit is written"


def test_sighup_reopens_the_log_file_and_usr1_usr2_are_ignored(tmp_path):
    path = tmp_path / "twist.log"
    port = freePort()
    process = subprocess.Popen(
        [
            TWIST,
            "--log-format=json",
            f"--log-file={path}",
            "sockets",
            "--listen",
            f"upper@tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        waitForPort(port, process)
        assert upperOnce(port, b"before") == b"BEFORE\n"
        path.rename(tmp_path / "twist.log.1")  # logrotate
        for number, logged in (
            (signal.SIGHUP, [b"SIGHUP"]),
            (signal.SIGUSR1, [b"SIGUSR1"]),
            (signal.SIGUSR2, [b"SIGUSR2"]),
        ):
            process.send_signal(number)  # one at a time: the kernel does not keep their order
            deadline = time.monotonic() + WAIT
            while (
                not (path.exists() and all(t in path.read_bytes() for t in logged))
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
        assert upperOnce(port, b"after") == b"AFTER\n"
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    old = [json.loads(line) for line in (tmp_path / "twist.log.1").read_text().splitlines()]
    new = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(e.get("bytes_in") == 7 for e in old), (
        "the record of the connection before the rotation"
    )
    assert [e["text"] for e in new[:3]] == [
        "SIGHUP: log file reopened",
        "SIGUSR1 ignored",
        "SIGUSR2 ignored",
    ]
    assert any(e.get("bytes_in") == 6 for e in new), (
        "the record of the connection after the rotation"
    )


def test_every_json_record_parses_and_carries_the_documented_fields():
    server = startServer("--listen", "upper@tcp:0:interface=127.0.0.1", json=True)
    try:
        target = server.service("upper").target
        for i in range(3):
            assert twistsock("upper", target, f"json {i}").returncode == 0
        server.waitFor(r"upper tcp .* service closed", count=3)
    finally:
        server.stop()
    records = [e for e in server.events if e["namespace"] == "twistsock.connection.Connection"]
    fields = {
        "time",
        "level",
        "namespace",
        "text",
        "service",
        "transport",
        "local",
        "peer",
        "reason",
        "detail",
        "duration",
        "bytes_in",
        "bytes_out",
        "tls_client_subject",
        "worker",
    }
    assert len(records) == 3 and all(set(r) == fields for r in records)
    assert all(not k.startswith("log_") for e in server.events for k in e)


def test_sink_logs_a_bounded_amount_per_connection(serve):
    """
    10 MiB in 10-byte writes: at most 100 message lines, then one line that
    says what was left out.
    """
    server = serve("--listen", "sink@tcp:0:interface=127.0.0.1")
    port = server.service("sink").port
    before = sum(len(line) + 1 for line in server.lines)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        piece = b"0123456789"
        for _ in range((10 << 20) // len(piece)):
            s.sendall(piece)
    server.waitFor(r"Ending connection$")
    logged = sum(len(line) + 1 for line in server.lines) - before
    messages = [line for line in server.lines if " -->" in line]
    (summary,) = [line for line in server.lines if "more messages" in line]
    assert len(messages) == 100
    left = int(summary.split("more messages (")[1].split(" bytes")[0])
    assert 0 < left < 10 << 20
    assert logged < 160 * 1024, (
        logged
    )  # the README's bound: 100 lines of at most 1 KiB, and a few more


def test_refused_connections_are_one_record_and_one_summary_per_burst(serve):
    server = serve("--max-connections", "1", "--listen", "echo@tcp:0:interface=127.0.0.1")
    port = server.service("echo").port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        for _ in range(200):
            try:
                # The reset may come before connect() returns: the kernel then reports it there.
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as refused:
                    assert refused.recv(1) == b""  # closed at once
            except ConnectionResetError:
                pass
        server.waitFor(r"199 more connections refused in \d+ s \(199 by max connections\)$")
    assert len([line for line in server.lines if ": limit after" in line]) == 1


def test_twist_sockets_runs_on_the_twistsock_reactor_unless_told_otherwise(serve):
    assert serve("--listen", "tcp:0:interface=127.0.0.1").waitFor(
        r"\] ready: 1 listening \(TwistsockReactor\)$"
    )
    chosen = serve(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        command=(TWIST, "--log-format=text", "--reactor=poll"),
    )
    assert chosen.waitFor(r"\] ready: 1 listening \(PollReactor\)$")


def test_workers_with_an_unread_log_pipe_serve_and_stop_on_sigterm():
    """The master and its workers share the pipe; each has its own buffer."""
    with unreadLog("--workers", "2") as (port, process):
        for i in range(1500):
            assert upperOnce(port, b"w%d" % i) == b"W%d\n" % i
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == -signal.SIGTERM
        log = process.stdout.read().decode()
    assert "Traceback" not in log
    for line in log.splitlines():  # lines from three processes, never cut into each other
        assert line.startswith("20") or line == "", line


def test_a_line_never_exceeds_one_write_whatever_the_message():
    """Escaping can make 1 KiB of bytes 10 KiB of JSON; such a line is formatted again, shorter."""
    from twisted.logger import LogLevel

    written: list[bytes] = []

    class Memory:
        def write(self, line: bytes) -> None:
            written.append(line)

    for format in ("json", "text"):
        observer = LineObserver(Memory(), format)  # type: ignore[arg-type]
        observer(
            {
                "log_format": "{peer} -->{message}",
                "peer": "p",
                "message": "\\xff" * 1024 + "\x1b" * 1024,
                "log_level": LogLevel.info,
                "log_namespace": "n",
                "log_time": 0.0,
            }
        )
    assert all(len(line) <= 4096 and line.count(b"\n") == 1 for line in written)
    assert json.loads(written[0])["text"].endswith("more characters]")


def test_reopening_a_fifo_without_a_reader_fails_at_once(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    output = LogOutput(open(fifo, "w"))
    os.close(reader)
    result: list[object] = []

    def reopen() -> None:
        try:
            result.append(output.reopen())
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=reopen)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "reopen() waited for a reader"
    assert isinstance(result[0], OSError)
    output.close(0)


def test_lines_lost_to_a_closed_output_are_counted():
    r, w = os.pipe()
    os.close(r)  # the reader is gone: writes fail with EPIPE
    output = LogOutput(os.fdopen(w, "w"))
    writeInThread(output, [b"lost %d\n" % i for i in range(10)])
    output.close(WAIT)
    assert output.dropped == 10


def test_numeric_options_name_themselves_and_log_buffer_is_bounded():
    from conftest import runTwist

    for args, message in (
        (
            ("--log-buffer", "abc"),
            "twistsock: error: --log-buffer: 'abc' is not a whole number (twist sockets "
            "--help lists the options)\n",
        ),
        (
            ("--max-connections", "x"),
            "twistsock: error: --max-connections: 'x' is not a whole number (twist sockets "
            "--help lists the options)\n",
        ),
        (
            ("--log-buffer", str(2 << 30)),
            "twistsock: error: --log-buffer must be from 4096 to 1073741824 (1 GiB) (twist "
            "sockets --help lists the options)\n",
        ),
    ):
        result = runTwist(*args)
        assert (result.returncode, result.stderr) == (1, message)


def test_a_server_whose_standard_output_is_closed_serves_and_stops_cleanly(short_tmp):
    """`twist sockets >&-`: nowhere to log, which is no reason not to serve."""
    path = short_tmp / "closed-stdout.sock"
    server = subprocess.Popen(
        ["bash", "-c", f'exec "$0" sockets --listen "echo@unix:{path}" >&-', TWIST],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not path.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT)
            s.connect(str(path))
            s.sendall(b"still served\n")
            assert s.recv(100) == b"still served\n"
        server.send_signal(signal.SIGTERM)
        assert server.wait(WAIT) == -signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        stderr = server.stderr.read().decode()
        server.stderr.close()
    assert stderr == ""
    assert not path.exists()
