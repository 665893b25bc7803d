"""Sphinx configuration: the prose in docs/*.md (MyST), the API by pydoctor into api/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

project = "twistsock"
author = "the twistsock developers"
copyright = "the twistsock developers, MIT licence"
release = version = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "twistsock" / "__init__.py").read_text()
)[1]

extensions = ["myst_parser", "sphinx.ext.intersphinx", "pydoctor.sphinx_ext.build_apidocs"]
intersphinx_mapping: dict = {}  # no network in CI: nothing fetched
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]
html_theme = "alabaster"
html_title = f"twistsock {release}"


def twistedInventory() -> str:
    """An objects.inv of the installed Twisted, made by pydoctor once per version (no network)."""
    import subprocess
    import sys

    import twisted

    inventory = ROOT / "docs" / "_build" / f"twisted-{twisted.__version__}"
    if not (inventory / "objects.inv").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pydoctor",
                "--make-intersphinx",
                "--project-name=Twisted",
                f"--html-output={inventory}",
                "-q",
                str(Path(twisted.__file__).parent),
            ],
            check=True,
            capture_output=True,
        )
    return (
        f"{inventory}/objects.inv::https://docs.twisted.org/en/twisted-{twisted.__version__}/api/"
    )


# The API reference: pydoctor reads the epytext docstrings (api/index.md is replaced by its
# output); Twisted's names link to Twisted's API reference of the installed version.
pydoctor_args = [
    "--project-name=twistsock",
    f"--project-version={release}",
    "--project-url=../index.html",
    "--docformat=epytext",
    "--html-output={outdir}/api",
    f"--project-base-dir={ROOT}",
    "--warnings-as-errors",
    f"--intersphinx-file={twistedInventory()}",
    str(ROOT / "twistsock"),
]
pydoctor_url_path = "api/"
