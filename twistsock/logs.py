"""
The log of C{twist sockets}: lines that can never stop the server.

C{twist} writes each event to its log file with a blocking C{write} and a
C{flush}: a log reader that stops reading (a full pipe, a paused journald,
C{| less}) stops the whole process, SIGTERM included.  Here the reactor only
formats a line and appends it to a bounded buffer; a thread of its own writes
the buffer out.  What does not fit is dropped and counted, and the count is
logged as soon as writing resumes (and shown in C{/metrics}).  At exit the
buffer is written out, waiting at most L{EXIT_WAIT} seconds for a reader.

Lines are one event each: C{text} is C{TIME [SYSTEM] TEXT}, as C{twist}
writes them; C{json} is one flat object per line (JSON Lines):
C{time}, C{level}, C{namespace}, C{text}, then the event's own fields.
"""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText
from zope.interface import implementer

#: Bytes of log lines held while the output is slow; past that they are dropped.
BUFFER_LIMIT = 4 << 20
#: Seconds the process waits at exit for its last lines to be written.
EXIT_WAIT = 5.0
#: Seconds the writing thread lets lines gather after each write.
BATCH_DELAY = 0.02
#: What one write() takes at most, so that lines from several processes
#: sharing one pipe (--workers) are never interleaved (POSIX's PIPE_BUF).
_CHUNK = 4096
#: What one write() to a regular file takes at most: Linux writes a regular
#: file whole under its lock, so lines from several processes cannot
#: interleave within one write, and a big write is one system call instead of
#: sixteen.
_FILE_CHUNK = 64 * 1024


class LogOutput:
    """
    Lines to a file from a thread of its own, through a buffer of at most
    C{limit} bytes.  L{write} never blocks.
    """

    def __init__(
        self,
        stream: IO[str],
        limit: int = BUFFER_LIMIT,
        summary: Callable[[int], bytes] | None = None,
    ) -> None:
        self.stream = stream
        self.limit = limit
        self._summary = summary or (
            lambda n: f"{n} log lines dropped: the log output did not keep up\n".encode()
        )
        self._size = 0
        self._missed = 0  # dropped since the last line that fitted
        #: Lines dropped in all, for the metrics.
        self.dropped = 0
        self._busy = False
        self._idle = False  # the thread waits for lines: the next one wakes it
        self._closed = False
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._fd = stream.fileno()
        self._chunk = _chunkFor(self._fd)
        self._lines: deque[Any] = deque()
        self._thread = threading.Thread(target=self._run, name="twistsock log", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (ending in a newline), or count it as dropped."""
        with self._lock:  # the condition's own lock, without its Python-level __enter__
            if self._closed:
                self._late(line)
                return
            if self._size + len(line) > self.limit:
                self._missed += 1
                self.dropped += 1
                return
            if self._missed:
                self._sayMissed()
            self._lines.append(line)
            self._size += len(line)
            if self._idle:
                self._idle = False
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._lines and not self._closed:
                    self._idle = True
                    self._wake.wait()
                self._idle = False
                if not self._lines:
                    return
                lines, self._lines = self._lines, deque()
                self._busy = True
            try:
                self._writeOut(lines)
            finally:
                with self._wake:
                    self._size -= sum(len(line) for line in lines if isinstance(line, bytes))
                    self._busy = False
                    if self._missed and self._size < self.limit // 2:
                        self._sayMissed()  # the output caught up: say at once what was lost
                    self._wake.notify_all()
            # Let lines gather: one wake-up and one write per batch, not per
            # line (each wake-up takes the GIL from the reactor's thread).
            if not self._closed:
                time.sleep(BATCH_DELAY)

    def _sayMissed(self) -> None:
        """
        Queue the line that counts the lines dropped since the last one that
        fitted (lock held).
        """
        summary, self._missed = self._summary(self._missed), 0
        self._lines.append(summary)
        self._size += len(summary)

    def _writeOut(self, lines: deque[Any]) -> None:
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if isinstance(line, _Switch):
                self._flushChunk(chunk)
                chunk, size = [], 0
                old, self.stream, self._fd = self.stream, line.stream, line.stream.fileno()
                self._chunk = _chunkFor(self._fd)
                old.close()
                continue
            if chunk and size + len(line) > self._chunk:
                self._flushChunk(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._flushChunk(chunk)

    def _flushChunk(self, chunk: list[bytes]) -> None:
        if chunk and not _all(self._fd, b"".join(chunk)):
            with self._wake:
                self.dropped += len(chunk)  # a closed or full output: lost, and counted

    def flush(self, timeout: float = EXIT_WAIT) -> bool:
        """
        Wait until every queued line is written, at most C{timeout} seconds;
        whether they were.
        """
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._lines or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout: float = EXIT_WAIT) -> bool:
        """
        Write what is queued (at most C{timeout} seconds) and stop the thread;
        later lines (the last few of an exit) are written at once, each if the
        output takes it within a second.
        """
        done = self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        return done

    def _late(self, line: bytes) -> None:
        try:
            if select.select([], [self._fd], [], 1.0)[1]:
                os.write(self._fd, line[:_CHUNK])  # writable: a pipe takes PIPE_BUF bytes at once
                return
        except OSError:
            pass
        self.dropped += 1

    def reopen(self) -> bool:
        """
        Open the log file again by its name (after logrotate moved it);
        whether there was one to reopen.  Standard output is left alone.
        """
        name = getattr(self.stream, "name", None)
        if (
            not isinstance(name, str)
            or self.stream in (sys.__stdout__, sys.__stderr__)
            or name.startswith("<")
        ):
            return False
        # Never blocks: a FIFO without a reader is an error (ENXIO), not a wait.
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        os.set_blocking(fd, True)  # the thread's writes may wait; the reactor never does
        # Opened through its name, so that the new stream has it for the next rotation
        # (os.fdopen would name it by its descriptor, and a second SIGHUP found no file).
        fresh = open(name, "a", encoding="utf-8", opener=lambda _path, _flags: fd)
        with self._wake:
            # The thread switches after the lines logged before the signal.
            self._lines.append(_Switch(fresh))
            if self._idle:
                self._idle = False
                self._wake.notify()
        return True


class _Switch:
    """In the queue of lines: go on in this (reopened) file."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream


def _chunkFor(fd: int) -> int:
    """The most one write() to C{fd} may take without lines of other processes cutting in."""
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    return _FILE_CHUNK if regular else _CHUNK


def _all(fd: int, data: bytes) -> bool:
    """
    Write all of C{data}; whether it could (a closed or full output loses
    lines, never the server).
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except OSError:
            return False
    return True


@implementer(ILogObserver)
class LineObserver:
    """Format each event as one line, text or JSON, and hand it to a L{LogOutput}."""

    def __init__(self, output: LogOutput, format: str) -> None:
        self.output = output
        self.format = _json if format == "json" else _text
        self._second = -1
        self._stamp = ""

    def __call__(self, event: dict[str, Any]) -> None:
        line = self.format(self, event).encode("utf-8", "backslashreplace")
        if len(line) > _CHUNK:
            # Longer lines could be cut into by another process sharing the pipe (--workers).
            line = self.format(self, {**event, _SHORT: True}).encode("utf-8", "backslashreplace")
        self.output.write(line)

    def record(self, namespace: str, fields: dict[str, Any]) -> None:
        """
        Write a connection record: the same line as for its event, made without
        the generic walk over the event.
        """
        if self.format is _json:
            line = {
                "time": self.stamp(time.time()),
                "level": "info",
                "namespace": namespace,
                "text": fields["record"],
            }
            line.update(fields)
            del line["record"]
            try:
                text = "".join(_chunks(line, 0)) if _chunks is not None else _encode(line)
                data = (text + "\n").encode("utf-8", "backslashreplace")
            except (TypeError, ValueError):
                data = b""  # a field JSON cannot hold: the generic path leaves it out
            if 0 < len(data) <= _CHUNK:
                self.output.write(data)
                return
        fields.update(
            log_format="{record}",
            log_level=LogLevel.info,
            log_namespace=namespace,
            log_time=time.time(),
        )
        self(fields)

    def stamp(self, when: float) -> str:
        """C{2026-11-29T15:00:00+0000}, computed once a second."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp


def _message(event: dict[str, Any]) -> str:
    if event.get("log_format") == "{record}" and "record" in event:
        return event["record"]  # the connection record: built already
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


#: Set in an event to format it again within one write (see L{LineObserver}).
_SHORT = "log_twistsock_short"
#: Characters of text a shortened line keeps: escaped, at most 6 bytes each.
_SHORT_TEXT = 500


def _cut(text: str) -> str:
    return (
        text
        if len(text) <= _SHORT_TEXT
        else text[:_SHORT_TEXT] + f"... [{len(text) - _SHORT_TEXT} more characters]"
    )


def _text(observer: LineObserver, event: dict[str, Any]) -> str:
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    message = _message(event)
    if _SHORT in event:
        message = _cut(message)
    return f"{observer.stamp(event.get('log_time', time.time()))} [{system}] {message}\n"


_PLAIN = (str, int, float, bool, type(None))
_encode = json.JSONEncoder(separators=(",", ":")).encode
# The C encoder json.dumps makes for every call, made once: without
# circular-reference checks (a record is a flat dict) it keeps no state.
# None on an interpreter without it (PyPy): _encode is used instead.
_chunks = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None,
        _encode.__self__.default,  # type: ignore[attr-defined]
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )
    if getattr(json.encoder, "c_make_encoder", None) is not None
    else None
)


def _json(observer: LineObserver, event: dict[str, Any]) -> str:
    level = event.get("log_level")
    text = _message(event)
    short = _SHORT in event
    if short:
        text = _cut(text)
    fields: dict[str, Any] = {
        "time": observer.stamp(event.get("log_time", time.time())),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "text": text,
    }
    whole = event.get("log_format")
    for key, value in event.items():
        if key.startswith("log_") or key in fields or whole == "{" + key + "}":
            continue
        if isinstance(value, _PLAIN) and not (
            short and isinstance(value, str) and len(value) > 100
        ):
            fields[key] = value
    return _encode(fields) + "\n"


#: The process's log output, once L{observerFactory} made it (for the metrics and signals).
current: LogOutput | None = None
#: Where connection records go straight to, under C{twist} at a level that shows them.
_direct: LineObserver | None = None


def record(log: Logger, **fields: Any) -> None:
    """
    Log a connection record (its text in C{record}, its fields beside).
    Under C{twist sockets} it goes straight to the log's observer: Twisted's
    publisher and level filter cost a fifth of a short connection's CPU, and
    twistsock's observer is the only one there.  Elsewhere (tests, twistd,
    scripts) it is an ordinary C{info} event.
    """
    if _direct is None:
        log.info("{record}", **fields)
        return
    _direct.record(log.namespace, fields)


def observerFactory(
    format: str, limit: int = BUFFER_LIMIT, level: LogLevel = LogLevel.info
) -> Callable[[IO[str]], LineObserver]:
    """
    What C{twist} calls with its log file to make its observer
    (C{fileLogObserverFactory}); C{level} is C{twist}'s C{--log-level}.
    """

    def make(stream: IO[str] | None) -> LineObserver:
        global current, _direct
        if stream is None:
            # twist's standard output was closed (`>&-`): the log goes nowhere, as asked.
            stream = open(os.devnull, "w", encoding="utf-8")
        observer = LineObserver(
            LogOutput(stream, limit, summary=lambda n: _summary(observer, n)), format
        )
        current = observer.output
        _direct = observer if level <= LogLevel.info else None
        return observer

    return make


def _summary(observer: LineObserver, count: int) -> bytes:
    event = {
        "log_namespace": __name__,
        "log_level": LogLevel.warn,
        "log_format": "{count} log lines dropped: the log output did not keep up",
        "log_time": time.time(),
        "count": count,
    }
    return observer.format(observer, event).encode()


def droppedLines() -> int:
    """Log lines this process dropped so far."""
    return current.dropped if current is not None else 0


def finish() -> None:
    """At exit: write out what is queued, waiting at most L{EXIT_WAIT} seconds."""
    if current is not None:
        current.close()
