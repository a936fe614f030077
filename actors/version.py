"""The relay's version string, one for ``--version``, STUN SOFTWARE and the portal User-Agent.

``<package version>+<git revision>`` when the revision is known: written into the package at
build time (``actors/revision.txt``, see :mod:`actors.build_revision`), or read from the git
checkout the code runs from. Without either it is the package version alone.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

__all__ = ["relay_version", "revision", "software"]

PACKAGE = "firezone-relay-py"
_HERE = Path(__file__).resolve().parent
REVISION_FILE = _HERE / "revision.txt"


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def git_revision(directory: Path) -> str | None:
    """The short commit of the checkout holding ``directory`` (``-dirty`` if modified), or
    None when it is no checkout or git is absent."""
    if not (directory / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), "describe", "--always", "--dirty", "--abbrev=8"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


@functools.cache
def revision() -> str | None:
    """The git revision this code was built from, when known."""
    try:
        text = REVISION_FILE.read_text().strip()
    except OSError:
        text = ""
    return text or git_revision(_HERE.parent)


@functools.cache
def relay_version() -> str:
    """``0.1.0+1a2b3c4d``, or ``0.1.0`` when the revision is unknown."""
    rev = revision()
    return f"{package_version()}+{rev}" if rev else package_version()


def software() -> str:
    """STUN SOFTWARE: ``firezone-relay-py; rev=<version>``, after Firezone's
    ``firezone-relay; rev=<sha>``."""
    return f"firezone-relay-py; rev={relay_version()}"
