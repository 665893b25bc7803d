"""
Coverage for every Python process the tests start (installed by .ci/run).

.ci/run copies this file into the test venv's site-packages and adds a .pth
file that imports it (named to run before coverage's own a1_coverage.pth), so
that each Python process started there (pytest, `twist sockets` and its
--workers, the `twistsock` command) starts coverage when
COVERAGE_PROCESS_START names a configuration (coverage.process_startup).

One more step is needed for servers: `twist` ends a process stopped by
SIGTERM or SIGINT by re-raising the signal with its default action
(twisted.application.app._exitWithSignal: SIG_DFL, then os.kill of itself),
so no atexit handler runs and coverage would write nothing; coverage's own
`sigterm` handler is replaced by the reactor's as it starts.  So os.kill is
wrapped: a process about to kill itself with a signal whose action is to end
it saves its coverage data first, as coverage's `patch = _exit` does for
os._exit.  Nothing else changes: the process still ends by that signal.
"""

from __future__ import annotations

import os
import signal

#: Signals whose default action ends the process.
_FATAL = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGABRT,
    signal.SIGUSR1,
    signal.SIGUSR2,
}


def _start() -> None:
    if not os.environ.get("COVERAGE_PROCESS_START"):
        return
    # A process that cannot write the data file (a test runs `twist` as nobody) is not
    # measured: coverage would print a traceback into the output the test checks.
    data = os.path.abspath(os.environ.get("COVERAGE_FILE", ".coverage"))
    if not os.access(os.path.dirname(data), os.W_OK):
        del os.environ["COVERAGE_PROCESS_START"]  # coverage's own .pth, after this one, too
        return
    try:
        import coverage
    except ImportError:  # not installed yet (.ci/run installs it with the test extra)
        return
    cov = coverage.process_startup() or coverage.Coverage.current()
    if cov is None:
        return
    kill = os.kill

    def killSavingCoverage(pid: int, number: int) -> None:
        if pid == os.getpid() and (
            number == signal.SIGKILL
            or (number in _FATAL and signal.getsignal(number) == signal.SIG_DFL)
        ):
            try:
                cov.stop()
                cov.save()
            except Exception:  # never keep a process from ending
                pass
        kill(pid, number)

    os.kill = killSavingCoverage


_start()
