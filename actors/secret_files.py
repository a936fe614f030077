"""The portal token and the credential secret, from flags, files and systemd credentials.

An operator hands secrets over in files: a token file (as Firezone's ``docker-init-relay.sh``
allows), a secret file (``--auth-secret-file``, re-read by reload), a systemd credential
(``LoadCredential=``: systemd copies a root-only file to ``$CREDENTIALS_DIRECTORY``, readable
by the service's dynamic user), or, standalone under systemd, a secret file the relay
generates once in the unit's ``StateDirectory`` so credentials survive restarts. Every
problem with such a file is a :class:`SecretFileError` whose message names the file and says
what to do; ``main`` prints it as one line and exits 2.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from firezone_relay.actors import admin

__all__ = [
    "MIN_SECRET_CHARS",
    "SECRET_CREDENTIAL",
    "TOKEN_CREDENTIAL",
    "AuthSecret",
    "SecretFileError",
    "load_auth_secret",
    "load_token",
]

#: the shortest credential secret accepted (an empty one lets anybody mint credentials)
MIN_SECRET_CHARS = admin.MIN_SECRET_CHARS
#: systemd credential names (``LoadCredential=token:...``, ``LoadCredential=auth-secret:...``)
TOKEN_CREDENTIAL = "token"
SECRET_CREDENTIAL = "auth-secret"
#: more than any token or secret; bounds what a mistaken path makes us read
_MAX_BYTES = 64 * 1024


class SecretFileError(ValueError):
    """A token or secret file cannot be used; the message names it and is complete."""


@dataclass(frozen=True, slots=True)
class AuthSecret:
    """The credential secret and where it came from (for the start-up line, never the value)."""

    value: str
    origin: str
    #: the file it lives in, if any (``firezone-relay credentials --auth-secret-file``)
    path: str | None = None
    generated: bool = False
    #: every secret of that file (all accepted, ``value`` the first); empty: just ``value``
    secrets: tuple[str, ...] = ()


def read_secret_file(path: Path, what: str) -> str:
    """The stripped contents of ``path``; SecretFileError naming it when it is missing, not a
    regular file, unreadable, empty, too large or not UTF-8."""
    try:
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "missing" if not path.exists() else "special"
            raise SecretFileError(f"the {what} file {path} is {kind}: give a regular file")
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except PermissionError:
        raise SecretFileError(
            f"cannot read the {what} file {path}: permission denied (the relay runs as uid "
            f"{os.getuid()}; under systemd hand it over with LoadCredential=, see README)"
        ) from None
    except OSError as exc:
        raise SecretFileError(
            f"cannot read the {what} file {path}: {os.strerror(exc.errno or 0).lower()}"
        ) from None
    if len(data) > _MAX_BYTES:
        raise SecretFileError(f"the {what} file {path} is larger than {_MAX_BYTES} bytes")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"the {what} file {path} is not UTF-8 text") from None
    if not text:
        raise SecretFileError(f"the {what} file {path} is empty")
    return text


def credential(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` when systemd passed that credential."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.exists() else None


def _names_a_path(value: str) -> bool:
    """Whether a token value is meant as a file: an explicit path, or an existing file."""
    if len(value) >= 4096 or "/" not in value:
        return False
    return value.startswith(("/", "./", "../")) or Path(value).exists()


def load_token(value: str | None) -> str | None:
    """The portal token: ``value``, the contents of the file it names, or the systemd
    credential ``token``; None (standalone mode) when there is none of them."""
    if value:
        if _names_a_path(value):
            return read_secret_file(Path(value), "token")
        return value
    path = credential(TOKEN_CREDENTIAL)
    return read_secret_file(path, "token credential") if path is not None else None


def _check_length(secret: str, where: str) -> str:
    if len(secret) < MIN_SECRET_CHARS:
        raise SecretFileError(
            f"the auth secret in {where} is too short ({len(secret)} characters): anyone could "
            f"mint credentials; use at least {MIN_SECRET_CHARS}, e.g. `openssl rand -hex 32`"
        )
    return secret


def state_secret_file() -> Path | None:
    """``$STATE_DIRECTORY/auth-secret``: where the unit's secret lives (``StateDirectory=``)."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(directory) / "auth-secret" if directory else None


def read_secrets(path: Path) -> tuple[str, ...]:
    """The secrets of a secret file (one per line, the first signs; ``actors.admin``), each
    long enough."""
    try:
        return admin.read_secret_file(str(path))
    except ValueError as exc:
        raise SecretFileError(str(exc)) from None


def load_auth_secret(flag: str | None, file: str | None, portal: bool = False) -> AuthSecret | None:
    """The credential secret, first found of: ``--auth-secret``; ``--auth-secret-file``; the
    systemd credential ``auth-secret``; standalone under systemd, ``$STATE_DIRECTORY/auth-secret``
    (generated there the first time, then kept across restarts). None: the caller generates
    one for this run (portal mode: as Firezone's relay does at every start)."""
    if file:
        if flag:
            raise SecretFileError("give --auth-secret or --auth-secret-file, not both")
        if portal:
            raise SecretFileError(
                "--auth-secret-file is for standalone mode (the portal gets its own)"
            )
        found = read_secrets(Path(file))
        return AuthSecret(found[0], file, file, secrets=found)
    if flag:
        return AuthSecret(flag, "--auth-secret")
    path = credential(SECRET_CREDENTIAL)
    if path is not None:
        value = _check_length(read_secret_file(path, "auth secret credential"), str(path))
        return AuthSecret(value, f"systemd credential {SECRET_CREDENTIAL}")
    state = state_secret_file()
    if state is None or portal:
        return None
    generated = not (state.exists() or state.is_symlink()) and _generate(state)
    found = read_secrets(state)
    return AuthSecret(found[0], str(state), str(state), generated, found)


def _generate(path: Path) -> bool:
    """Write a new secret to ``path`` (mode 0600, never over an existing file: a relay that
    started at the same moment wrote it first, and that one is read). True if written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        reason = os.strerror(exc.errno or 0).lower()
        raise SecretFileError(f"cannot create the auth secret file {path}: {reason}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True
