"""The TLS server context for TURN over TLS (``turns:``), and its reload on SIGHUP.

TLS 1.2 and 1.3 only, ALPN ``stun.turn`` (RFC 7443) selected when the client offers it (a
client offering nothing, or only other protocols, still gets a session: browsers vary), and
the whole chain of the certificate file served (Let's Encrypt's ``fullchain.pem``). The
listener takes ``TlsContexts.context`` for each new connection, so a reload changes what new
connections get and leaves open ones alone; a file that does not load keeps the old context
and logs one error (through the reload that ran it).
"""

from __future__ import annotations

import logging
import ssl

__all__ = ["ALPN", "TlsConfigError", "TlsContexts", "build_context"]

logger = logging.getLogger("relay.tls")

ALPN = "stun.turn"


class TlsConfigError(Exception):
    """The certificate or key could not be loaded; the message names the file and the cause."""


def build_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its key (reads both files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols([ALPN])
    for path in (cert_file, key_file):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise TlsConfigError(
            f"cannot load the TLS certificate {cert_file} with key {key_file}: {reason} "
            "(a PEM certificate chain and the key that belongs to it?)"
        ) from None
    return context


class TlsContexts:
    """The current server context; ``reload`` swaps it only for one that loaded."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        #: what new connections get (read on the loop; replaced whole, never mutated)
        self.context = build_context(cert_file, key_file)
        self.reloads = 0
        self.reload_failures = 0

    def reload(self) -> str | None:
        """A reload hook (``Admin.reload_hooks``: SIGHUP, ``firezone-relay reload``): read the
        files again and make them what new connections get. The files are small, read once per
        reload on the loop. Returns the error, for the reload's one log line and report, when
        they do not load; the previous certificate then stays."""
        try:
            context = build_context(self.cert_file, self.key_file)
        except TlsConfigError as exc:
            self.reload_failures += 1
            return f"TLS reload failed, keeping the previous certificate: {exc}"
        self.context = context
        self.reloads += 1
        logger.info("TLS certificate reloaded from %s", self.cert_file)
        return None
