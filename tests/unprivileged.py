"""Running the relay as ``nobody``, as systemd's ``DynamicUser=yes`` would: this test
environment's packages hard-linked where that user can read them (``.tox`` and a pyenv under
/root are not), and an interpreter it can run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AS_NOBODY", "unprivileged_python", "world_readable_site"]

#: the setpriv prefix that runs a command as nobody:nogroup with no supplementary groups
AS_NOBODY = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")


@contextmanager
def world_readable_site() -> Iterator[Path]:
    """A directory (mode 0755) whose ``site`` holds this environment's packages; removed
    afterwards. Run with ``PYTHONPATH=<it>/site``."""
    base = Path(tempfile.mkdtemp(prefix="fzrelay-", dir="/tmp"))
    try:
        base.chmod(0o755)
        purelib = sysconfig.get_paths()["purelib"]
        subprocess.run(["cp", "-al", purelib, str(base / "site")], check=True, timeout=60)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def unprivileged_python() -> str | None:
    """An interpreter nobody can run, of this interpreter's minor version (None: none)."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for python in candidates:
        res = subprocess.run([*AS_NOBODY, python, "-V"], capture_output=True, timeout=30)
        if res.returncode == 0:
            return python
    return None
