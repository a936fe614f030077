"""``firezone-relay <subcommand>``: the verbs beside running the relay, in one table.

``SUBCOMMANDS`` maps each verb to a one-line summary (listed at the end of ``--help``) and the
function that runs it, named as ``module:function`` so that a verb's imports cost nothing until
it runs. Adding a verb is one row here plus its function, which takes the arguments after the
verb and returns the exit code; it builds its parser with :func:`verb_parser`, so
``firezone-relay <verb> --help`` and ``firezone-relay help <verb>`` work and a bad argument is
one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast

__all__ = ["SUBCOMMANDS", "Subcommand", "run_subcommand", "subcommand_summary", "verb_parser"]


@dataclass(frozen=True, slots=True)
class Subcommand:
    """A verb: what it does, in one line, and ``module:function`` that runs it."""

    summary: str
    target: str

    def run(self, argv: Sequence[str]) -> int:
        module, _, function = self.target.partition(":")
        main = cast(
            Callable[[Sequence[str]], int], getattr(importlib.import_module(module), function)
        )
        return main(argv)


_HERE = "firezone_relay.actors.subcommands"
_ADMIN = "firezone_relay.actors.admin_cli"

#: Every verb, in the order ``--help`` lists them.
SUBCOMMANDS: Final[Mapping[str, Subcommand]] = {
    "credentials": Subcommand(
        "print a TURN username and password that a relay with this secret accepts",
        f"{_HERE}:credentials_main",
    ),
    "systemd-unit": Subcommand(
        "print the systemd unit, its XDP drop-in or its environment file",
        "firezone_relay.actors.systemd_unit:main",
    ),
    "sessions": Subcommand(
        "list the running relay's allocations (admin socket)",
        f"{_ADMIN}:sessions_main",
    ),
    "disconnect": Subcommand(
        "free a client's allocations on the running relay", f"{_ADMIN}:disconnect_main"
    ),
    "drain": Subcommand(
        "stop taking new allocations; exit once the last one is gone (SIGUSR1 too)",
        f"{_ADMIN}:drain_main",
    ),
    "reload": Subcommand(
        "re-read --auth-secret-file and --peer-list-file (SIGHUP too)", f"{_ADMIN}:reload_main"
    ),
    "top": Subcommand("a live view of the running relay", f"{_ADMIN}:top_main"),
    "help": Subcommand(
        "show this help, or a subcommand's (help <subcommand>)", f"{_HERE}:help_main"
    ),
}


def subcommand_summary() -> str:
    """The end of ``firezone-relay --help``: one line per verb."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {verb.summary}" for name, verb in SUBCOMMANDS.items()]
    return "subcommands (firezone-relay <subcommand> --help for each):\n" + "\n".join(lines)


#: a first argument shaped like a verb, not a portal token (those are long and opaque)
_VERB_LIKE = re.compile(r"[a-z][a-z-]{0,23}")


def run_subcommand(argv: Sequence[str]) -> int | None:
    """Run the verb ``argv[0]`` names; None when it names none (run the relay). A word that
    looks like a verb but is none is an error, not a portal token."""
    if not argv:
        return None
    verb = SUBCOMMANDS.get(argv[0])
    if verb is not None:
        return verb.run(argv[1:])
    if _VERB_LIKE.fullmatch(argv[0]):
        from firezone_relay.actors.cli import Parser

        Parser(prog="firezone-relay").error(
            f"unknown subcommand {argv[0]!r} (one of: {', '.join(SUBCOMMANDS)}; a portal "
            "token goes in FIREZONE_TOKEN or after the flags)"
        )
    return None


def verb_parser(verb: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``firezone-relay <verb>``: errors are one line and a pointer to help."""
    from firezone_relay.actors.cli import Parser

    return Parser(prog=f"firezone-relay {verb}", description=description)


# -- help ------------------------------------------------------------------------------------


def help_main(argv: Sequence[str]) -> int:
    """``firezone-relay help [subcommand]``."""
    from firezone_relay.actors.cli import build_parser

    p = verb_parser("help", "Show the relay's help, or a subcommand's.")
    p.add_argument("subcommand", nargs="?", help="one of: " + ", ".join(SUBCOMMANDS))
    args = p.parse_args(argv)
    if args.subcommand is None:
        build_parser().print_help()
        return 0
    verb = SUBCOMMANDS.get(args.subcommand)
    if verb is None:
        p.error(f"unknown subcommand {args.subcommand!r} (one of: {', '.join(SUBCOMMANDS)})")
    try:
        return verb.run(["--help"])
    except SystemExit as exc:  # argparse's --help exits 0
        return int(exc.code or 0)


# -- credentials -----------------------------------------------------------------------------


def credentials_parser() -> argparse.ArgumentParser:
    from firezone_relay.actors import cli

    p = verb_parser(
        "credentials",
        "Print a TURN username and password that a relay with this secret accepts.",
    )
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--auth-secret",
        type=cli._auth_secret,
        default=cli._env("AUTH_SECRET"),
        metavar="SECRET",
        help="the relay's secret [env: AUTH_SECRET]",
    )
    secret.add_argument(
        "--auth-secret-file",
        default=cli._env("AUTH_SECRET_FILE"),
        metavar="FILE",
        help="the relay's secret file, whose first secret signs; the unit's is "
        "/var/lib/firezone-relay/auth-secret [env: AUTH_SECRET_FILE]",
    )
    p.add_argument(
        "--auth-scheme",
        choices=("firezone", "rest"),
        type=cli._one_of("firezone", "rest"),
        default=cli._env("AUTH_SCHEME", "firezone"),
        help="(default: firezone) [env: AUTH_SCHEME]",
    )
    p.add_argument("--ttl", type=cli._positive, default=3600, help="seconds until expiry")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--salt", help="firezone scheme: the salt (default: random)")
    who.add_argument("--user", help="rest scheme: the user name (default: random)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def credentials_main(argv: Sequence[str]) -> int:
    from firezone_relay.actors.admin import read_secret_file
    from firezone_relay.protocol.auth import make_credentials

    p = credentials_parser()
    args = p.parse_args(argv)
    secret = args.auth_secret
    # a flag given on the command line wins over the other's environment variable
    if args.auth_secret_file and not (secret and "--auth-secret" in argv):
        try:
            secret = read_secret_file(args.auth_secret_file)[0]
        except ValueError as exc:
            p.error(str(exc))
    if not secret:
        p.error("give --auth-secret or --auth-secret-file (or AUTH_SECRET / AUTH_SECRET_FILE)")
    user = args.salt or args.user or secrets.token_urlsafe(12)
    expiry = int(time.time()) + args.ttl
    username, password = make_credentials(args.auth_scheme, secret, expiry, user)
    if args.json:
        print(json.dumps({"username": username, "password": password, "expiry": expiry}))
    else:
        print(f"username={username}")
        print(f"password={password}")
    sys.stdout.flush()
    return 0
