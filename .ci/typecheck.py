"""mypy --strict on the daemon as the import package it installs as (``firezone_relay``).

The folders keep the project's layout (``protocol/``, ``actors/``, ``xdp/``) while the code
imports ``firezone_relay.protocol`` and so on; a link tree in ``.typecheck/`` gives mypy that
package without installing anything, so errors name the source files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("protocol", "actors", "xdp")


def main() -> int:
    tree = ROOT / ".typecheck" / "firezone_relay"
    tree.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        link = tree / part
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", part))
    os.chdir(ROOT)
    os.environ["MYPYPATH"] = str(ROOT / ".typecheck")
    packages = [arg for part in PARTS for arg in ("-p", f"firezone_relay.{part}")]
    os.execvp("mypy", ["mypy", "--strict", *packages, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
