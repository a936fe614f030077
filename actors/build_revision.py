"""Build step: record the git revision in the package (``actors/revision.txt``), so an
installed relay can say which commit it runs (``--version``, SOFTWARE, User-Agent).

Hooked into setuptools' ``build_py`` from ``pyproject.toml``. ``GITHUB_SHA`` wins when set (CI);
outside a git checkout nothing is written and the version stays the package version.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools.command.build_py import build_py

from actors.version import git_revision


class BuildPy(build_py):  # type: ignore[misc]
    """setuptools' build_py plus ``revision.txt`` in the built ``actors`` package."""

    def run(self) -> None:
        super().run()
        sha = os.environ.get("GITHUB_SHA", "")[:8]
        rev = sha or git_revision(Path.cwd())
        if rev:
            target = Path(self.build_lib) / "actors" / "revision.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rev + "\n")
