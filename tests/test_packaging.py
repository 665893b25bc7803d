"""
The wheel carries the dropin where twist finds it (the editable install is what
the other tests use).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("twistsock-*.whl")
    return built


def test_wheel_has_the_dropin_and_no_init_in_twisted(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/twistsock_sockets.py" in names
    assert "twistsock/tap.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(name.endswith("dropin.cache") for name in names)


def test_wheel_ships_py_typed_for_type_checkers(wheel):
    assert "twistsock/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_twist_finds_sockets_from_the_wheel_alone(wheel, tmp_path):
    """
    A fresh environment that sees Twisted but not this checkout: only the wheel
    can add `sockets`.
    """
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    site = Path(
        subprocess.check_output(
            [
                env / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            text=True,
        ).strip()
    )
    # Twisted and friends from the test environment; its .pth files (the
    # editable install of this checkout) are not processed from here.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    help = [
        env / "bin" / "python",
        "-c",
        "from twisted.application.twist._twist import Twist; Twist.main(['twist', 'sockets', "
        "'--help'])",
    ]

    before = subprocess.run(help, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "Unknown command: sockets" in before.stdout + before.stderr

    zipfile.ZipFile(wheel).extractall(site)
    after = subprocess.run(help, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert after.returncode == 0, after.stderr
    assert "--listen" in after.stdout


def test_wheel_metadata_names_the_licence_and_one_version(wheel):
    import twistsock

    names = zipfile.ZipFile(wheel).namelist()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text
    assert f"Version: {twistsock.__version__}\n" in text  # the version has one source
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_sdist_carries_what_the_readme_tells_users_to_install(tmp_path):
    import tarfile

    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("twistsock-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "CONTRIBUTING.md",
        "SECURITY.md",
        "contrib/systemd/twistsock.service",
        "contrib/systemd/twistsock@.socket",
        "twistsock/py.typed",
    ):
        assert needed in names, needed
