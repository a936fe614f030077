"""The C data-path helper (actors/_udpio.c) compiles without a warning under -Wall -Wextra
-Werror. The wheel build treats the extension as optional (a machine without a compiler still
installs the relay), so a warning there would pass unseen: the lint environment compiles it
here, strictly, and fails on the first warning."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "actors" / "_udpio.c"]


def main() -> int:
    include = sysconfig.get_paths()["include"]
    for source in SOURCES:
        command = [
            "gcc",
            "-c",
            "-o",
            "/dev/null",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{include}",
        ]
        result = subprocess.run([*command, str(source)])
        if result.returncode != 0:
            print(
                f"{source.relative_to(ROOT)}: warnings under -Wall -Wextra -Werror", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
