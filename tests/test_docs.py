"""Every command shown in docs/ works as written and prints what the page shows.

Each page's C{console} blocks are one shell session, run in a network namespace of its own
(C{unshare -rn}: the pages' fixed ports are free whatever else runs) and an empty directory that
holds C{.venv}. The conventions, also in CONTRIBUTING.md:

  - C{$ } starts a command (a line ending in C{\\} continues on the next); the lines after it, up
    to the next command, are what it prints (standard output and error); C{...} in a line stands
    for any text, a line that is only C{...} for any number of lines.
  - A command ending in C{&} runs in the background (its output must go to a file); the session
    goes on once every port or UNIX socket it names is listening.
  - A block right after C{<!-- not run: REASON -->} is not run (root, a real network, an
    interactive terminal); the reason is required.

This module, run as a script with a page's path, is the driver inside the namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))

#: An upper bound on one command, or on a background server becoming ready; never a goal.
WAIT = 60.0

MARKER = "@@ twistsock docs @@"
#: Commands that only read files (a log): safe to ask again.
READS_A_FILE = re.compile(
    r"(?:sleep [\d.]+; )?(?:grep|cat|tail|head|wc) [^|;&<>]*"
    r"(?:\| (?:grep|wc|tail|head|sort)[^|;&<>]*)*\Z"
)
SKIP = re.compile(r"<!-- not run: (.+?) -->\s*\n```console\n", re.S)


def blocks(text: str) -> list[tuple[str | None, str]]:
    """Each console block with the reason it is not run (or None)."""
    found = []
    for match in re.finditer(r"(<!-- not run: (.+?) -->\s*\n)?```console\n(.*?)\n```", text, re.S):
        found.append((match[2], match[3]))
    return found


def commands(block: str) -> list[tuple[str, list[str]]]:
    """The commands of a block, each with the lines it is shown to print."""
    result: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):  # the shell joins the lines, as in a terminal
                command += "\n" + next(lines).removeprefix("> ")
            result.append((command, []))
        else:
            assert result, f"output before any command: {line!r}"
            result[-1][1].append(line)
    return result


def matches(shown: list[str], printed: list[str]) -> bool:
    """Whether the printed lines are what is shown (C{...} as above)."""
    parts = []
    for line in shown:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.fullmatch("".join(parts), "".join(p + "\n" for p in printed)) is not None


def listeners(command: str, cwd: Path = Path()) -> list[tuple[str, object]]:
    """
    What a background command listens on: TCP and UDP ports, UNIX socket paths (in twistsock's
    endpoint strings, and the options of openssl, socat, ncat, systemd-socket-activate, and the
    bind lines of an HAProxy configuration file).
    """
    found: list[tuple[str, object]] = []
    for word in command.split():
        for kind, port in re.findall(r"(?:^|[@:])(tcp6?|ssl|mtls|udp):(\d+)", word):
            found.append(("udp" if kind == "udp" else "tcp", int(port)))
        for port in re.findall(r"(?:^|:)port=(\d+)", word):
            found.append(("tcp", int(port)))
        for path in re.findall(r"(?:^|@)unix:([^:\s]+)", word):
            found.append(("unix", path))
    for port in re.findall(r"(?:-accept|LISTEN:|-l -p|--listen-port|-l)\s*(\d+)", command):
        found.append(("tcp", int(port)))
    for config in re.findall(r"haproxy .*-f\s+(\S+)", command):
        for port in re.findall(r"^\s*bind\s+\S*:(\d+)", (cwd / config).read_text(), re.M):
            found.append(("tcp", int(port)))
    return found


def listening(kind: str, where: object, cwd: Path) -> bool:
    if kind == "unix":
        path = cwd / str(where)
        if not path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(path)) == 0
    table = {"tcp": ("/proc/net/tcp", "/proc/net/tcp6"), "udp": ("/proc/net/udp", "/proc/net/udp6")}
    for name in table[kind]:
        for row in Path(name).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == where and (kind == "udp" or state == "0A"):
                return True
    return False


def test_every_page_is_in_the_table_of_contents():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page != "index.md":
            assert f"\n{page[:-3]}\n" in index, page


def test_conventions():
    """The parts the driver reads (so that the runs below cannot pass on nothing)."""
    assert commands("$ a \\\n> b\nout\n...\n$ c") == [("a \\\nb", ["out", "..."]), ("c", [])]
    assert matches(["x ... y", "...", "z"], ["x 1 y", "q", "r", "z"])
    assert matches(["...", "z"], ["z"])
    assert not matches(["x ... y"], ["x 1 z"])
    assert not matches(["a"], ["a", "b"])
    assert listeners(
        "twist sockets --listen upper@tcp:6789 --listen sink@unix:s.sock --metrics "
        "tcp:9100:interface=127.0.0.1 --listen udp:5000 > log &"
    ) == [("tcp", 6789), ("unix", "s.sock"), ("tcp", 9100), ("udp", 5000)]
    assert listeners("systemd-socket-activate -l 5005 --fdname=echo twist sockets &") == [
        ("tcp", 5005)
    ]
    ran = sum(reason is None for page in PAGES for reason, _ in blocks((DOCS / page).read_text()))
    assert ran >= 10
    for page in PAGES:
        text = (DOCS / page).read_text()
        assert "```sh\n" not in text, f"{page}: commands go in console blocks, run by this test"
        assert len(SKIP.findall(text)) == sum(r is not None for r, _ in blocks(text))


@pytest.mark.parametrize("page", [p for p in PAGES if "```console" in (DOCS / p).read_text()])
def test_page_commands_run_as_written(page, tmp_path):
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) runs each page in a network namespace of its own"
    run = subprocess.run(
        [unshare, "-rn", sys.executable, __file__, page, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20 * WAIT,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    failures = [
        f"$ {command}\n--- shown:\n" + "\n".join(shown) + "\n--- printed:\n" + "\n".join(printed)
        for command, shown, printed in report["commands"]
        if not matches(shown, printed)
    ]
    assert not failures, f"{page}:\n" + "\n\n".join(failures)
    assert report["error"] is None, report["error"]


def _drive(page: str, workdir: Path) -> dict:
    """Inside the namespace: the page's blocks in one shell, a command at a time."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (workdir / ".venv").symlink_to(sys.prefix)
    shell = subprocess.Popen(
        ["bash", "--norc", "--noprofile"],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "100"},
        start_new_session=True,
    )
    assert shell.stdin is not None and shell.stdout is not None
    report: dict = {"commands": [], "error": None}

    def say(line: str) -> None:
        assert shell.stdin is not None
        shell.stdin.write(line + "\n")
        shell.stdin.flush()

    try:
        for reason, block in blocks((DOCS / page).read_text()):
            if reason is not None:
                continue
            for command, shown in commands(block):
                deadline = time.monotonic() + WAIT
                while True:
                    say(command)
                    say(f'__status=$?; echo "{MARKER}"; (exit $__status)')
                    printed = []
                    while (line := shell.stdout.readline()) and line.rstrip("\n") != MARKER:
                        printed.append(line.rstrip("\n"))
                    # A log is written by a thread of the server's, a moment after the event (as
                    # a reader at a terminal sees it): a command that only reads one is asked
                    # again until it shows what the page does (bounded).
                    if (
                        not line
                        or matches(shown, printed)
                        or not READS_A_FILE.match(command)
                        or time.monotonic() > deadline
                    ):
                        break
                    time.sleep(0.1)
                report["commands"].append((command, shown, printed))
                if not line:
                    report["error"] = f"the shell ended at: $ {command}"
                    return report
                if command.rstrip().endswith("&"):
                    wanted = listeners(command, workdir)
                    if not wanted:
                        report["error"] = f"cannot tell when this is ready: $ {command}"
                        return report
                    deadline = time.monotonic() + WAIT
                    while not all(listening(k, w, workdir) for k, w in wanted):
                        if time.monotonic() > deadline:
                            report["error"] = f"not listening after {WAIT} s: $ {command}"
                            return report
                        time.sleep(0.05)
    finally:
        say("kill $(jobs -p) 2>/dev/null; wait; exit 0")
        try:
            shell.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, 9)
    return report


if __name__ == "__main__":
    print(json.dumps(_drive(sys.argv[1], Path(sys.argv[2]))))
