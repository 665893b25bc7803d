"""
The C{twistsock} command's entry point: signals are answered from the first
instant, before Twisted is imported (a fifth of a second during which Ctrl-C
was a traceback and SIGTERM a silent 143).
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted(number: int, frame: object) -> None:
    sys.stderr.write("twistsock: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Run C{twistsock} (see L{twistsock.cli.main})."""
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    from .cli import main as run  # the slow part: Twisted, pyOpenSSL

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run()
