"""The build backend: setuptools' own, whose ``build_py`` also records the git revision in the
package (``actors/revision.txt``), so an installed relay can say which commit it runs
(``--version``, SOFTWARE, User-Agent).

``pyproject.toml`` names this module as the backend (``backend-path = ["."]``, so the build
can import it) and ``BuildPy`` as the ``build_py`` command. ``GITHUB_SHA`` wins when set (CI);
outside a git checkout nothing is written and the version stays the package version.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks)
from setuptools.command.build_py import build_py

from .version import git_revision


class BuildPy(build_py):
    """setuptools' build_py plus ``revision.txt`` in the built ``actors`` package."""

    def run(self) -> None:
        super().run()
        sha = os.environ.get("GITHUB_SHA", "")[:8]
        rev = sha or git_revision(Path.cwd())
        if rev:
            target = Path(self.build_lib) / "firezone_relay" / "actors" / "revision.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rev + "\n")
