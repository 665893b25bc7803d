"""The README's commands are the ones CI runs, and its first session works as written.

The first session is run in a network namespace of its own (C{unshare -rn}), so that its fixed
ports (5000, 5001, 6789) are free whatever else runs on the machine: this module, run as a
script, is the driver inside the namespace.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: How long the session may wait for a line of the server's log (an upper bound, never a goal).
WAIT = 30.0


def section(title: str) -> str:
    return README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def readmeCommands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", section("Install, run, test"))


def test_readme_has_a_run_and_a_test_command():
    run, test = readmeCommands()
    assert "twist sockets" in run
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command():
    _, test = readmeCommands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in lines


def test_readme_is_a_front_page():
    """The README stays a front page; the rest lives in docs/."""
    assert len(README.read_text().splitlines()) <= 200


class Session:
    """The first session, read from the README: three console blocks."""

    def __init__(self, text: str) -> None:
        blocks = re.findall(r"```console\n(.+?)\n```", text, re.S)
        assert len(blocks) == 3, "the first session is three console blocks"
        start, self.clients, after = (b.splitlines() for b in blocks)
        self.install, self.server = (line[2:] for line in start if line.startswith("$ "))
        self.started = [line for line in start if not line.startswith("$ ")]
        cut = next(i for i, line in enumerate(after) if line.startswith("^C"))
        self.served = after[:cut]
        self.stopped = [after[cut][2:]] + after[cut + 1 :]

    def commands(self) -> list[tuple[str, list[str]]]:
        """Each client command with the lines it is shown to print."""
        result: list[tuple[str, list[str]]] = []
        for line in self.clients:
            if line.startswith("$ "):
                result.append((line[2:], []))
            else:
                result[-1][1].append(line)
        return result


def pattern(line: str) -> re.Pattern[str]:
    """A shown line as a pattern: C{...} stands for anything (a timestamp, a port, a time)."""
    return re.compile(".*?".join(re.escape(part) for part in line.split("...")) + r"\Z")


def test_first_session_shows_what_the_driver_checks():
    """The parts the driver reads are there (so that the run below cannot pass on nothing)."""
    session = Session(section("A first session"))
    assert session.install == "python3 -m venv .venv && .venv/bin/pip install -q ."
    assert session.server.startswith(".venv/bin/twist sockets ")
    assert len(session.commands()) == 7
    assert all(pattern(line) for line in session.started + session.served + session.stopped)
    assert pattern("... ready: 4 listening (X)").match("2026 [x#info] ready: 4 listening (X)")
    assert not pattern("a ... b").match("a x c")


def test_first_session_runs_as_written(tmp_path):
    """Every command of the first session, and what the README shows them print.

    The install line is not run here: CI installs the package into C{.venv} with the same pip, and
    tests/test_packaging.py installs the wheel alone and finds C{twist sockets}.
    """
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) runs the session in a network namespace of its own"
    run = subprocess.run(
        [unshare, "-rn", sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=4 * WAIT + 30,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    for command, shown, printed in report["commands"]:
        assert printed == shown or all(
            pattern(s).match(p) for s, p in zip(shown, printed, strict=True)
        ), f"$ {command}\nshown:\n{shown}\nprinted:\n{printed}"
    assert report["missing"] == [], "the server's log lacks:\n" + "\n".join(report["missing"])
    assert report["status"] == -signal.SIGINT, report["log"]  # the shell says 130
    assert report["leftover"] == [], "files left behind"


def _drive(workdir: Path) -> dict:
    """Inside the namespace: the server on a terminal, the clients in a shell, then Ctrl-C."""
    session = Session(section("A first session"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (workdir / ".venv").symlink_to(sys.prefix)

    primary, secondary = pty.openpty()
    server = subprocess.Popen(
        ["bash", "-c", session.server],
        cwd=workdir,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        start_new_session=True,
    )
    os.close(secondary)
    log: list[str] = []
    lock = threading.Lock()

    def read() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            with lock:
                log.extend(line.decode("utf-8", "replace").rstrip("\r") for line in lines)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def await_(shown: list[str], start: int = 0) -> tuple[list[str], int]:
        """Wait for the shown lines in order from line C{start}: the missing ones, and where."""
        deadline = time.monotonic() + WAIT
        while True:
            with lock:
                seen = list(log)
            position, missing = start, []
            for line in shown:
                match = pattern(line)
                found = next((i for i in range(position, len(seen)) if match.match(seen[i])), None)
                if found is None:
                    missing.append(line)
                else:
                    position = found + 1
            if not missing or time.monotonic() > deadline or server.poll() is not None:
                return missing, position
            time.sleep(0.05)

    missing, position = await_(session.started)
    commands = []
    if not missing:
        marker = "@@ twistsock first session @@"
        script = "".join(
            f'{command}\n__status=$?; echo "{marker}"; (exit $__status)\n'
            for command, _ in session.commands()
        )
        clients = subprocess.run(
            ["bash", "-c", script],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=WAIT,
        )
        outputs = clients.stdout.split(marker + "\n")
        for (command, shown), printed in zip(session.commands(), outputs, strict=False):
            commands.append((command, shown, printed.splitlines()))
        more, position = await_(session.served, position)
        missing += more
    os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    try:
        status = server.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        status = server.wait()
    reader.join(timeout=5)
    if not missing:
        missing += await_(session.stopped, position)[0]
    os.close(primary)
    (workdir / ".venv").unlink()
    leftover = sorted(p.name for p in workdir.iterdir())
    return {
        "commands": commands,
        "missing": missing,
        "status": status,
        "leftover": leftover,
        "log": "\n".join(log),
    }


if __name__ == "__main__":
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    print(json.dumps(_drive(directory)))
