"""``firezone-relay systemd-unit``: the unit, its XDP drop-in and its environment file.

The unit is written with the path of the ``firezone-relay`` that prints it (a venv's, pipx's or
/usr/local/bin's), so it deploys unedited. The files ship in the package (``systemd/``);
the unit's ``ExecStart=`` line is the only one rewritten.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

__all__ = ["executable", "main", "render"]

#: what each option prints: the packaged file's name
_FILES = {"unit": "firezone-relay.service", "env": "firezone-relay.env", "xdp": "xdp.conf"}
#: where ProtectHome=yes leaves nothing for the service to execute
_HIDDEN = ("/home/", "/root/", "/run/user/")


def packaged(name: str) -> str:
    return files("firezone_relay.actors").joinpath("systemd", name).read_text()


def executable() -> str:
    """The command line that runs this firezone-relay: the console script that is running, or
    the one installed beside this interpreter, or this interpreter with ``-m``."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "firezone-relay" and argv0.is_file():
        return str(argv0.absolute())
    beside = Path(sys.executable).parent / "firezone-relay"
    if beside.is_file():
        return str(beside)
    return shlex.join([sys.executable, "-m", "firezone_relay.actors.cli"])


def render(command: str) -> str:
    """The packaged unit with ``ExecStart=`` running ``command``."""
    lines = [
        f"ExecStart={command}" if line.startswith("ExecStart=") else line
        for line in packaged(_FILES["unit"]).splitlines()
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    from firezone_relay.actors.subcommands import verb_parser

    p = verb_parser(
        "systemd-unit",
        "Print the systemd unit for this firezone-relay (ExecStart= is its path), or with "
        "--xdp the drop-in XDP offload needs, or with --env the environment file. See "
        '"Deployment" in the README.',
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--env", action="store_true", help="print the environment file (/etc/firezone-relay/)"
    )
    what.add_argument(
        "--xdp",
        action="store_true",
        help="print the drop-in granting XDP's capabilities "
        "(/etc/systemd/system/firezone-relay.service.d/xdp.conf)",
    )
    args = p.parse_args(argv)
    if args.env:
        sys.stdout.write(packaged(_FILES["env"]))
        return 0
    if args.xdp:
        sys.stdout.write(packaged(_FILES["xdp"]))
        return 0
    command = executable()
    if command.startswith(_HIDDEN):
        sys.stderr.write(
            f"firezone-relay systemd-unit: warning: ExecStart={command.split()[0]} is under a "
            "home directory, which the unit's ProtectHome=yes and DynamicUser=yes hide from "
            "the service: install into /opt (see README)\n"
        )
    sys.stdout.write(render(command))
    return 0
