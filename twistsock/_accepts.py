"""
Running out of file descriptors: refuse, log once per burst, recover.

When the process is at its open-file limit, Twisted's listening port already
does the right thing for the connections it cannot take: it frees a reserved
descriptor, accepts each waiting client and closes it at once (the client is
refused instead of left hanging), and reserves the descriptor again.  But it
logs three lines per event and one per refused client: thousands of lines
in a burst.  L{AcceptErrors} takes the place of that port's logger: the
first refusal of a burst is one warning, the end of the burst (a second
without one) is one summary, and every refused connection is counted for
the metrics.  Other events pass through unchanged.

The open-file limit itself is raised to the hard limit at start (as Go
programs and many servers do), so the default soft limit of 1024 does not
cap C{--max-connections}.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

#: Why a connection was refused, as the metrics say it.
REFUSED_NO_DESCRIPTORS = "no file descriptors"
#: Seconds without a refusal that end a burst.
QUIET = 1.0

_REFUSED = "EMFILE recovery: Closed socket from {address}"
_FAILED = "Could not accept new connection ({acceptError})"
_NOISE = (
    "EMFILE encountered; releasing reserved file descriptor.",
    "Re-reserving EMFILE recovery file descriptor.",
)


@implementer(ILogObserver)
class AcceptErrors:
    """Stand in for one listening port's logger: summarize its accept failures."""

    log = Logger()

    def __init__(
        self, reactor: Any, service: str, endpoint: str, tally: Any, original: Any
    ) -> None:
        self.reactor = reactor
        self.service = service
        self.endpoint = endpoint
        #: The registry's refusal tallies, by (service, reason).
        self.tally = tally
        self.original = original
        self.refused = 0
        self.failed = 0
        self.started: float | None = None
        self.last = 0.0
        self._check: Any = None

    @classmethod
    def watch(
        cls, port: Any, reactor: Any, service: str, endpoint: str, tally: Any
    ) -> AcceptErrors | None:
        """
        Summarize C{port}'s accept failures, if it is a Twisted port that logs
        them; else leave it be.
        """
        logger = getattr(port, "_logger", None)
        if not isinstance(logger, Logger):
            return None
        watcher = cls(reactor, service, endpoint, tally, logger.observer)
        port._logger = Logger(namespace=logger.namespace, source=logger.source, observer=watcher)
        return watcher

    def __call__(self, event: dict) -> None:
        format = event.get("log_format")
        if format == _REFUSED:
            self.refused += 1
            self.tally[(self.service, REFUSED_NO_DESCRIPTORS)] += 1
        elif format == _FAILED:
            self.failed += 1
        elif format not in _NOISE:
            self.original(event)
            return
        self._burst(event.get("acceptError"))

    def _burst(self, error: str | None) -> None:
        now = self.reactor.seconds()
        self.last = now
        if self.started is not None:
            return
        self.started = now
        self.log.warn(
            "cannot take new connections on {endpoint} ({service}): no file descriptor left "
            "({error}, open-file limit {limit}); "
            "refusing them until connections close",
            endpoint=self.endpoint,
            service=self.service,
            error=error or "EMFILE",
            limit=openFileLimit(),
        )
        self._check = self.reactor.callLater(QUIET, self._maybeEnded)

    def _maybeEnded(self) -> None:
        assert self.started is not None  # set by the burst that scheduled this
        now = self.reactor.seconds()
        if now - self.last < QUIET:
            self._check = self.reactor.callLater(QUIET - (now - self.last), self._maybeEnded)
            return
        self._check = None
        self.log.warn(
            "taking connections on {endpoint} ({service}) again after {seconds:.1f} s: "
            "{refused} refused, {failed} left waiting, for lack of file descriptors",
            endpoint=self.endpoint,
            service=self.service,
            seconds=self.last - self.started,
            refused=self.refused,
            failed=self.failed,
        )
        self.started = None
        self.refused = self.failed = 0

    def stop(self) -> None:
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None


def openFileLimit() -> int:
    """The process's soft limit on open files."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def openDescriptors() -> int:
    """Descriptors this process has open (Linux's /proc; elsewhere a guess of 64)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself used
    except OSError:
        return 64


def raiseOpenFileLimit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; return both soft limits, before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft
