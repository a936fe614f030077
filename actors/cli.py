"""``firezone-relay``: the reference relay's flags and environment variables, plus standalone mode.

``firezone-relay --public-ip4-addr 127.0.0.1 --allow-loopback-peers`` runs a TURN server on a
laptop: with no portal token the relay is standalone, and its credential secret comes from
``--auth-secret``, a systemd credential or ``--auth-secret-file`` (``actors.secret_files``), or
is generated for the run. The verbs beside it (``credentials``, ``systemd-unit``, ``help``) are
the table in ``actors.subcommands``. Every bad flag, variable or file is one line and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from firezone_relay.actors.secret_files import (
    MIN_SECRET_CHARS,
    SECRET_CREDENTIAL,
    TOKEN_CREDENTIAL,
    load_auth_secret,
    load_token,
)
from firezone_relay.actors.signals import install_startup_handlers
from firezone_relay.actors.version import relay_version, software

if TYPE_CHECKING:
    from firezone_relay.actors.daemon import Settings

__all__ = ["build_parser", "main", "settings_from_args"]


class _EnvText(str):
    """A default read from the environment variable ``name``. argparse runs string defaults
    through the flag's own ``type=`` validator, so ``LISTEN_PORT=abc`` fails exactly like
    ``--listen-port abc`` (exit 2), and the error names the variable."""

    name: str

    def __new__(cls, value: str, name: str) -> _EnvText:
        text = super().__new__(cls, value)
        text.name = name
        return text


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value is None or value == "" else _EnvText(value, name)


def _env_bool(name: str) -> bool:
    return str(_env(name, "false")).strip().lower() in ("1", "true", "yes", "on")


def _local_addresses() -> frozenset[str]:
    from firezone_relay.actors.sockets import local_addresses

    try:
        return local_addresses()
    except OSError:
        return frozenset()


def _env_tristate(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


_Parse = TypeVar("_Parse")


def _validator(parse: Callable[[str], _Parse]) -> Callable[[str], _Parse]:
    """A ``type=`` validator whose error, for a value from the environment, names the
    variable (argparse reports it as ``argument --flag: ...`` and exits 2)."""

    @functools.wraps(parse)
    def checked(text: str) -> _Parse:
        try:
            return parse(text)
        except argparse.ArgumentTypeError as exc:
            if isinstance(text, _EnvText):
                raise argparse.ArgumentTypeError(
                    f"bad environment variable value {text.name}={str(text)!r}: {exc}"
                ) from None
            raise

    return checked


def _ip(version: int) -> Callable[[str], str]:
    @_validator
    def parse(text: str) -> str:
        try:
            address = ipaddress.ip_address(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if address.version != version:
            raise argparse.ArgumentTypeError(f"not an IPv{version} address: {text}")
        return str(address)

    return parse


@_validator
def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {str(text)!r}") from None
    if not 0 < value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def _public_ip(version: int) -> Callable[[str], str]:
    """A public address clients send to: never unspecified or multicast (nobody can reach
    those); loopback and private ones pass with a warning at start (``warn_doubtful``)."""
    plain = _ip(version)

    @_validator
    def parse(text: str) -> str:
        address = ipaddress.ip_address(plain(text))
        if address.is_unspecified or address.is_multicast or str(address) == "255.255.255.255":
            kind = "unspecified" if address.is_unspecified else "multicast or broadcast"
            raise argparse.ArgumentTypeError(
                f"{address} is {kind}: no client can send to it; give the address clients "
                "reach the relay on"
            )
        return str(address)

    return parse


@_validator
def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer_ips(text: str) -> Any:
    """One CIDR from a flag, or the comma-separated list of its environment variable."""
    if isinstance(text, _EnvText):
        return [
            _cidr(_EnvText(item.strip(), text.name)) for item in text.split(",") if item.strip()
        ]
    return _cidr(text)


class _AppendPeerIp(argparse.Action):
    """``--allowed-peer-ip`` / ``--denied-peer-ip``: repeatable, and added to the list from the
    environment (the default, checked by the same validator)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        try:
            items = list(_peer_ips(current) if isinstance(current, str) else current or ())
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, [*items, values])


@_validator
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {str(text)!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


@_validator
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {str(text)!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


@_validator
def _auth_secret(text: str) -> str:
    """Refuse a secret anyone could guess: an empty one lets anybody mint credentials."""
    if len(text) < MIN_SECRET_CHARS:
        raise argparse.ArgumentTypeError(
            f"too short ({len(text)} characters): anyone could mint credentials; use at least "
            f"{MIN_SECRET_CHARS}, e.g. `openssl rand -hex 32`"
        )
    return str(text)


@_validator
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {str(text)!r}") from None


@_validator
def _text(text: str) -> str:
    return str(text)


def _one_of(*choices: str) -> Callable[[str], str]:
    """For ``choices=`` flags: argparse checks choices on the command line only, this checks
    the environment default too."""

    @_validator
    def parse(text: str) -> str:
        if text not in choices:
            wanted = ", ".join(repr(c) for c in choices)
            raise argparse.ArgumentTypeError(
                f"invalid choice: {str(text)!r} (choose from {wanted})"
            )
        return str(text)

    return parse


@_validator
def _host_port(text: str) -> str:
    """``host:port`` of an HTTP endpoint; empty turns the endpoint off."""
    from firezone_relay.actors.http_endpoints import parse_host_port

    if text:
        try:
            parse_host_port(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return str(text)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and a pointer to ``--help``: the line that
    matters comes first, never after a screen of usage (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for help.\n")


#: ``firezone-relay --help`` usage: the flags are listed by group below it.
_USAGE = "%(prog)s [FLAGS] [TOKEN [NAME]]\n       %(prog)s <subcommand> [ARGS]   (see below)"


def build_parser() -> argparse.ArgumentParser:
    """The relay's flags, grouped as an operator looks for them; each help line ends with its
    default and its environment variable (``[env: NAME]``, as clap prints Firezone's)."""
    from firezone_relay.actors.subcommands import subcommand_summary

    p = Parser(
        prog="firezone-relay",
        usage=_USAGE,
        description="STUN/TURN relay, Firezone-compatible. With a portal token it joins the\n"
        "Firezone portal; without one it is a standalone TURN server for WebRTC.",
        epilog=subcommand_summary(),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {relay_version()}")

    net = p.add_argument_group("network (where clients reach the relay)")
    a = net.add_argument
    a(
        "--public-ip4-addr",
        type=_public_ip(4),
        default=_env("PUBLIC_IP4_ADDR"),
        metavar="ADDR",
        help="public IPv4 address clients reach (XOR-RELAYED-ADDRESS); at least one of the two "
        "(default: none)",
    )
    a(
        "--public-ip6-addr",
        type=_public_ip(6),
        default=_env("PUBLIC_IP6_ADDR"),
        metavar="ADDR",
        help="public IPv6 address clients reach (default: none)",
    )
    a(
        "--listen-port",
        type=_port,
        default=_env("LISTEN_PORT", 3478),
        metavar="PORT",
        help="STUN/TURN UDP port (default: 3478)",
    )
    a(
        "--lowest-port",
        type=_port,
        default=_env("LOWEST_PORT", 49152),
        metavar="PORT",
        help="first port of the allocation range, 1024 or above (default: 49152)",
    )
    a(
        "--highest-port",
        type=_port,
        default=_env("HIGHEST_PORT", 65535),
        metavar="PORT",
        help="last port of the allocation range (default: 65535)",
    )
    a(
        "--bind-ip4-addr",
        type=_ip(4),
        default=_env("BIND_IP4_ADDR", "0.0.0.0"),
        metavar="ADDR",
        help="local IPv4 address to bind (default: 0.0.0.0)",
    )
    a(
        "--bind-ip6-addr",
        type=_ip(6),
        default=_env("BIND_IP6_ADDR", "::"),
        metavar="ADDR",
        help="local IPv6 address to bind (default: ::)",
    )
    a(
        "--listen-address-discovery-method",
        choices=("gce_metadata", "aws_ec2_metadata"),
        type=_one_of("gce_metadata", "aws_ec2_metadata"),
        default=_env("LISTEN_ADDRESS_DISCOVERY_METHOD"),
        help="fill a missing public address from the cloud's metadata service (endpoint: "
        "GCE_METADATA_HOST, AWS_EC2_METADATA_SERVICE_ENDPOINT) (default: none)",
    )

    auth = p.add_argument_group("authentication (standalone mode, the credentials clients present)")
    a = auth.add_argument
    a(
        "--auth-secret",
        type=_auth_secret,
        default=_env("AUTH_SECRET"),
        metavar="SECRET",
        help=f"credential secret, at least {MIN_SECRET_CHARS} characters (default: "
        f"--auth-secret-file, else the systemd credential '{SECRET_CREDENTIAL}', else "
        "generated for this run)",
    )
    a(
        "--auth-secret-file",
        type=_text,
        default=_env("AUTH_SECRET_FILE"),
        metavar="FILE",
        help="credential secrets, one per line: all accepted, the first signs new credentials; "
        "re-read by `firezone-relay reload` and SIGHUP (default: none; under systemd "
        "$STATE_DIRECTORY/auth-secret, generated once)",
    )
    a(
        "--auth-scheme",
        choices=("firezone", "rest"),
        type=_one_of("firezone", "rest"),
        default=_env("AUTH_SCHEME", "firezone"),
        help="firezone: <expiry>:<salt> / SHA-256; rest: coturn's use-auth-secret "
        "(default: firezone)",
    )
    a(
        "--realm",
        type=_text,
        default=_env("REALM", "firezone"),
        help="REALM of the long-term credentials (default: firezone)",
    )

    portal = p.add_argument_group("portal (Firezone mode, with a token the relay joins the portal)")
    a = portal.add_argument
    a(
        "token",
        nargs="?",
        type=_text,
        default=_env("FIREZONE_TOKEN"),
        metavar="TOKEN",
        help=f"portal token, or the path of a file holding it; the systemd credential "
        f"'{TOKEN_CREDENTIAL}' when unset (default: none = standalone mode)",
    )
    a(
        "name",
        nargs="?",
        type=_text,
        default=_env("FIREZONE_NAME"),
        metavar="NAME",
        help="relay name shown in the portal (default: none)",
    )
    a(
        "--api-url",
        type=_text,
        default=_env("FIREZONE_API_URL"),
        metavar="URL",
        help="portal URL, e.g. wss://api.firezone.dev (default: none)",
    )
    a(
        "--token-in-query",
        action="store_true",
        default=_env_bool("TOKEN_IN_QUERY"),
        help="also send the token as the legacy `token` query parameter (default: off)",
    )

    peers = p.add_argument_group("peers (which peer addresses clients may relay to)")
    a = peers.add_argument
    a(
        "--allow-loopback-peers",
        action="store_true",
        default=_env_bool("ALLOW_LOOPBACK_PEERS"),
        help="allow loopback peers, for labs (default: off)",
    )
    a(
        "--allow-private-peers",
        action="store_true",
        default=_env_bool("ALLOW_PRIVATE_PEERS"),
        help="allow private and CGNAT peers (default: off standalone, on in portal mode)",
    )
    a(
        "--allowed-peer-ip",
        action=_AppendPeerIp,
        type=_peer_ips,
        default=_env("ALLOWED_PEER_IP", []),
        metavar="CIDR",
        help="always allow peers in CIDR (repeatable; overrides --denied-peer-ip and the "
        "built-in refusals, e.g. 203.0.113.0/24 for Firezone's lab; env: comma-separated) "
        "(default: none)",
    )
    a(
        "--denied-peer-ip",
        action=_AppendPeerIp,
        type=_peer_ips,
        default=_env("DENIED_PEER_IP", []),
        metavar="CIDR",
        help="refuse peers in CIDR (repeatable; env: comma-separated) (default: none)",
    )
    a(
        "--peer-list-file",
        type=_text,
        default=_env("PEER_LIST_FILE"),
        metavar="FILE",
        help="lines 'allow CIDR' / 'deny CIDR' added to --allowed-peer-ip / --denied-peer-ip; "
        "re-read by reload (default: none)",
    )

    xdp = p.add_argument_group("XDP offload (relay ChannelData in the kernel)")
    a = xdp.add_argument
    a(
        "--ebpf-offloading",
        type=_text,
        default=_env("EBPF_OFFLOADING"),
        metavar="IFACE",
        help="attach the XDP program to IFACE (default: off, userspace only)",
    )
    a(
        "--ebpf-attach-mode",
        choices=("driver", "generic"),
        type=_one_of("driver", "generic"),
        default=_env("EBPF_ATTACH_MODE", "driver"),
        help="driver (native XDP) or generic (skb) mode (default: driver)",
    )
    a(
        "--ebpf-mandatory",
        action="store_true",
        default=_env_bool("EBPF_MANDATORY"),
        help="exit instead of relaying in userspace when XDP offload cannot start (default: off)",
    )
    a(
        "--ebpf-int4-addr",
        type=_ip(4),
        default=_env("EBPF_INT4_ADDR"),
        metavar="ADDR",
        help="the interface's own IPv4 address when the public one is NATed to it "
        "(default: the public address)",
    )
    a(
        "--ebpf-int6-addr",
        type=_ip(6),
        default=_env("EBPF_INT6_ADDR"),
        metavar="ADDR",
        help="the interface's own IPv6 address (default: the public address)",
    )

    limits = p.add_argument_group("limits (quotas and anti-abuse bounds)")
    a = limits.add_argument
    a(
        "--max-allocations",
        type=_positive,
        default=_env("MAX_ALLOCATIONS"),
        metavar="N",
        help="allocations in total, at most the port range and what the descriptor limit "
        "allows (default: that ceiling)",
    )
    a(
        "--max-allocations-per-user",
        type=_positive,
        default=_env("MAX_ALLOCATIONS_PER_USER"),
        metavar="N",
        help="allocations per username with the rest scheme (default: 256)",
    )
    a(
        "--max-channels-per-allocation",
        type=_positive,
        default=_env("MAX_CHANNELS_PER_ALLOCATION"),
        metavar="N",
        help="channels (bound or cooling down) per allocation (default: 1024 standalone; in "
        "portal mode the whole channel-number space, 4096, so connlib never meets it)",
    )
    a(
        "--max-permissions-per-allocation",
        type=_positive,
        default=_env("MAX_PERMISSIONS_PER_ALLOCATION", 1024),
        metavar="N",
        help="permissions per allocation (default: 1024)",
    )
    single = limits.add_mutually_exclusive_group()
    single.add_argument(
        "--single-allocation-per-username",
        dest="single_allocation_per_username",
        action="store_const",
        const=True,
        help="a new Allocate frees the username's previous allocation (default: on with the "
        "firezone scheme)",
    )
    single.add_argument(
        "--no-single-allocation-per-username",
        dest="single_allocation_per_username",
        action="store_const",
        const=False,
        help="let one username hold several allocations, as WebRTC apps that share one "
        "credential across peer connections need (default: on with the rest scheme)",
    )
    p.set_defaults(single_allocation_per_username=_env_tristate("SINGLE_ALLOCATION_PER_USERNAME"))
    a(
        "--unauthenticated-rate-limit",
        type=_positive_float,
        default=_env("UNAUTHENTICATED_RATE_LIMIT"),
        metavar="PER_SECOND",
        help="answers per second (burst: twice that) to one source IP before it authenticates "
        "(Binding, 401 challenges, errors): limits reflection (default: no limit)",
    )
    a(
        "--allocation-rate-limit",
        type=_positive,
        default=_env("ALLOCATION_RATE_LIMIT"),
        metavar="BYTES_PER_S",
        help="relayed bytes per second per allocation, each direction (excess dropped); "
        "relays in userspace only (no XDP, no C route mirror) (default: no limit)",
    )

    tel = p.add_argument_group("telemetry (logs, metrics and traces)")
    a = tel.add_argument
    a(
        "--log-format",
        choices=("human", "json"),
        type=_one_of("human", "json"),
        default=_env("LOG_FORMAT", "human"),
        help="log lines on stderr as text or JSON (default: human)",
    )
    a(
        "--log-filter",
        type=_text,
        default=_env("RUST_LOG", "info"),
        metavar="DIRECTIVES",
        help="log directives, e.g. 'info,relay=debug' (default: info)",
    )
    a(
        "--otlp-grpc-endpoint",
        type=_text,
        default=_env("OTLP_GRPC_ENDPOINT"),
        metavar="HOST:PORT",
        help="OTLP/gRPC collector for traces and metrics; OTEL_* variables are honoured "
        "(default: none)",
    )
    a(
        "--otel-metadata-discovery-method",
        choices=("gce_metadata",),
        type=_one_of("gce_metadata"),
        default=_env("OTEL_METADATA_DISCOVERY_METHOD"),
        help="add service.instance.id, gcp.gce.instance.name and cloud.region from the "
        "metadata service to the OpenTelemetry resource (default: none)",
    )

    ops = p.add_argument_group("operations (endpoints for health checks, metrics and control)")
    a = ops.add_argument
    a(
        "--health-check-addr",
        type=_host_port,
        default=_env("HEALTH_CHECK_ADDR", "0.0.0.0:8080"),
        metavar="HOST:PORT",
        help="GET /healthz, /readyz and /metrics (Prometheus); empty: off (default: 0.0.0.0:8080)",
    )
    a(
        "--control-endpoint",
        type=_host_port,
        default=_env("CONTROL_ENDPOINT", "127.0.0.1:9999"),
        metavar="HOST:PORT",
        help="POST /log_filter?directives=... changes log levels at run time; empty: off "
        "(default: 127.0.0.1:9999)",
    )
    a(
        "--admin-socket",
        type=_text,
        default=_env("ADMIN_SOCKET"),
        metavar="PATH",
        help="the Unix socket of the operator verbs (sessions, disconnect, drain, reload, top) "
        "(default: /run/firezone-relay/control-<port of --control-endpoint>.sock)",
    )
    a(
        "--num-worker-threads",
        type=_positive,
        default=_env("NUM_WORKER_THREADS", 1),
        metavar="N",
        help="worker processes, each with its own event loop, core and share of the allocation "
        "ports, under one supervisor (Firezone's tokio workers); 1: one process (default: 1)",
    )
    a(
        "--rng-seed",
        type=_int,
        default=_env("RNG_SEED"),
        metavar="N",
        help="make port choice deterministic (tests); secrets and nonces always come from the "
        "OS (default: entropy)",
    )
    a(  # hidden: real-time expiry tests and simulations only
        "--time-scale",
        type=_positive_float,
        default=_env("TIME_SCALE", 1.0),
        help=argparse.SUPPRESS,
    )
    _add_stream_flags(p)
    _add_firezone_extras(p)
    _show_env(p)
    return p


def _add_stream_flags(p: argparse.ArgumentParser) -> None:
    """TURN over TCP (on the listen port) and TLS (README: "TURN over TCP and TLS")."""
    streams = p.add_argument_group("streams (TURN over TCP and TLS)")
    a = streams.add_argument
    a(
        "--no-tcp",
        action="store_true",
        default=_env_bool("NO_TCP"),
        help="do not accept TURN over TCP on the listen port (default: TCP on)",
    )
    a(
        "--tls-listen-port",
        type=_port,
        default=_env("TLS_LISTEN_PORT", 5349),
        help="TURN over TLS port, used when a certificate and key are given (default: 5349)",
    )
    a(
        "--tls-cert-file",
        type=_text,
        default=_env("TLS_CERT_FILE"),
        metavar="PEM",
        help="certificate chain (e.g. fullchain.pem) for TURN over TLS; SIGHUP re-reads it "
        "(default: none, no TLS)",
    )
    a(
        "--tls-key-file",
        type=_text,
        default=_env("TLS_KEY_FILE"),
        metavar="PEM",
        help="private key of --tls-cert-file; SIGHUP re-reads it (default: none)",
    )
    a(
        "--proxy-protocol-from",
        action=_AppendPeerIp,
        type=_peer_ips,
        default=_env("PROXY_PROTOCOL_FROM", []),
        metavar="CIDR",
        help="connections from CIDR must start with a PROXY protocol v1/v2 header, whose "
        "client address the relay then uses (repeatable; env: comma-separated); no one "
        "else's header is believed (default: none)",
    )
    a(
        "--max-stream-connections",
        type=_positive,
        default=_env("MAX_STREAM_CONNECTIONS", 8192),
        help="TCP and TLS connections open at once (default: 8192)",
    )
    a(
        "--max-stream-connections-per-source",
        type=_positive,
        default=_env("MAX_STREAM_CONNECTIONS_PER_SOURCE", 64),
        help="TCP and TLS connections open at once from one client address (default: 64)",
    )


#: Flags whose environment variable is not the flag's name in upper case (clap's rule).
_ENV_NAMES = {
    "token": "FIREZONE_TOKEN",
    "name": "FIREZONE_NAME",
    "api_url": "FIREZONE_API_URL",
    "log_filter": "RUST_LOG",
    "telemetry": "TELEMETRY, FIREZONE_TELEMETRY",
}


def _add_firezone_extras(p: argparse.ArgumentParser) -> None:
    """Firezone's flags that mean nothing here, accepted so a Firezone deployment's command
    line and environment start this relay unchanged (see ``warn_unsupported``)."""
    extras = p.add_argument_group(
        "ignored (Firezone's flags, accepted so its configuration runs; one warning each)"
    )
    a = extras.add_argument
    a(
        "--telemetry",
        action="store_true",
        default=_env_bool("TELEMETRY") or _env_bool("FIREZONE_TELEMETRY"),
        help="Firezone's Sentry crash reporting (default: off)",
    )
    a(
        "--google-cloud-project-id",
        type=_text,
        default=_env("GOOGLE_CLOUD_PROJECT_ID"),
        metavar="ID",
        help="Firezone's project ID for Google Cloud log records (default: none)",
    )
    p.set_defaults(resource_attributes={})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Never wraps inside ``[env: NAME]``, so the names can be grepped from ``--help``; the
    description and the list of subcommands keep their lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        glued = re.sub(r"\[env: [^\]]*\]", lambda m: m.group().replace(" ", "\0"), text)
        lines = textwrap.wrap(
            " ".join(glued.split()), width, break_long_words=False, break_on_hyphens=False
        )
        return [line.replace("\0", " ") for line in lines]


def _show_env(p: argparse.ArgumentParser) -> None:
    """Append ``[env: NAME]`` to every flag's help, as clap does for Firezone's relay."""
    for action in p._actions:
        if action.dest in ("help", "version") or action.help == argparse.SUPPRESS:
            continue
        env = f"[env: {_ENV_NAMES.get(action.dest, action.dest.upper())}]"
        action.help = f"{action.help} {env}" if action.help else env


def discover(args: argparse.Namespace) -> None:
    """Cloud metadata discovery (``LISTEN_ADDRESS_DISCOVERY_METHOD``,
    ``OTEL_METADATA_DISCOVERY_METHOD``): fills ``args`` in place. Exits 1, saying what failed,
    when asked to discover the public address and none can be found."""
    import logging

    from firezone_relay.actors.metadata import (
        MetadataError,
        fill_public_ips,
        otel_resource_attributes,
    )

    log = logging.getLogger("relay")
    method = args.listen_address_discovery_method
    if method:
        try:
            args.public_ip4_addr, args.public_ip6_addr = fill_public_ips(
                method, args.public_ip4_addr, args.public_ip6_addr
            )
        except MetadataError as exc:
            log.error("%s; set PUBLIC_IP4_ADDR / PUBLIC_IP6_ADDR instead", exc)
            raise SystemExit(1) from None
    if args.otel_metadata_discovery_method:
        try:
            args.resource_attributes = otel_resource_attributes(args.otel_metadata_discovery_method)
        except MetadataError as exc:
            log.warning("OpenTelemetry resource left without instance metadata: %s", exc)
        else:
            log.info("OpenTelemetry resource from instance metadata: %s", args.resource_attributes)


def warn_unsupported(args: argparse.Namespace) -> None:
    """Say once, at WARN, which accepted Firezone flags have no meaning here."""
    import logging

    log = logging.getLogger("relay")
    if args.telemetry:
        log.warning(
            "--telemetry (TELEMETRY / FIREZONE_TELEMETRY) is ignored: this relay sends no crash "
            "reports to Firezone's Sentry; use --otlp-grpc-endpoint for traces and metrics"
        )
    if args.google_cloud_project_id:
        log.warning(
            "--google-cloud-project-id (GOOGLE_CLOUD_PROJECT_ID) is ignored: there is no "
            "google-cloud log format (Firezone removed it too)"
        )


def warn_doubtful(args: argparse.Namespace) -> None:
    """Say once, at WARN, when a public address is one most clients cannot reach."""
    import logging

    log = logging.getLogger("relay")
    for flag, text in (
        ("--public-ip4-addr", args.public_ip4_addr),
        ("--public-ip6-addr", args.public_ip6_addr),
    ):
        if not text:
            continue
        address = ipaddress.ip_address(text)
        kind = (
            "loopback"
            if address.is_loopback
            else "link-local"
            if address.is_link_local
            else "non-public (private or reserved)"
            if not address.is_global
            else None
        )
        if kind is not None:
            log.warning(
                "%s %s is a %s address: only clients that reach this host on it can use the "
                "relay (fine for a lab; give the public address for the internet)",
                flag,
                text,
                kind,
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The one place a parsed command line becomes configuration: the core's
    ``ServerConfig``, the portal's ``PortalConfig`` and the XDP manager's ``XdpOptions`` are
    built here, once, from values the flags' validators already checked (environment
    defaults included), with the token and secrets read from their files
    (``actors.secret_files``). Cross-flag checks and unusable files raise ValueError (``main``
    exits 2 with it, one line)."""
    from firezone_relay.actors.admin import (
        AdminConfig,
        admin_socket_path,
        read_peer_list_file,
    )
    from firezone_relay.actors.daemon import Settings
    from firezone_relay.actors.portal import PortalConfig
    from firezone_relay.actors.streams import StreamOptions
    from firezone_relay.actors.xdp_manager import XdpOptions
    from firezone_relay.protocol.channel_data import CHANNEL_NUMBERS
    from firezone_relay.protocol.server import ServerConfig

    if args.public_ip4_addr is None and args.public_ip6_addr is None:
        raise ValueError(
            "Must listen on at least one of IPv4 or IPv6 (--public-ip4-addr / --public-ip6-addr)"
        )
    _check_ports(args)
    token = load_token(args.token)
    if token is not None and not args.api_url:
        raise ValueError("a portal token needs --api-url / FIREZONE_API_URL")
    if token is not None:
        _check_portal_pins(args)
    max_channels = args.max_channels_per_allocation
    if max_channels is None:
        max_channels = CHANNEL_NUMBERS if token is not None else 1024
    secret = load_auth_secret(args.auth_secret, args.auth_secret_file, portal=token is not None)
    admin = AdminConfig(
        # a generated secret file is re-read by reload too (add a line to rotate)
        auth_secret_file=(secret.path if secret is not None and secret.secrets else None),
        peer_list_file=args.peer_list_file or None,
        allowed_peer_ips=tuple(args.allowed_peer_ip or ()),
        denied_peer_ips=tuple(args.denied_peer_ip or ()),
    )
    allowed, denied = admin.allowed_peer_ips, admin.denied_peer_ips
    if admin.peer_list_file:
        more_allowed, more_denied = read_peer_list_file(admin.peer_list_file)
        allowed, denied = allowed + more_allowed, denied + more_denied
    server = ServerConfig(
        public_ip4=args.public_ip4_addr,
        public_ip6=args.public_ip6_addr,
        listen_port=args.listen_port,
        lowest_port=args.lowest_port,
        highest_port=args.highest_port,
        auth_scheme=args.auth_scheme,
        realm=args.realm,
        allow_loopback_peers=args.allow_loopback_peers,
        # Portal mode follows Firezone's relay: private and CGNAT peers allowed.
        allow_private_peers=args.allow_private_peers or token is not None,
        allowed_peer_ips=allowed,
        denied_peer_ips=denied,
        max_allocations=args.max_allocations,
        max_allocations_per_user=args.max_allocations_per_user,
        max_channels_per_allocation=max_channels,
        max_permissions_per_allocation=args.max_permissions_per_allocation,
        single_allocation_per_username=args.single_allocation_per_username,
        unauthenticated_rate_limit=args.unauthenticated_rate_limit,
        allocation_rate_limit=args.allocation_rate_limit,
        local_addresses=_local_addresses(),
        time_scale=args.time_scale,
        software=software(),
    )
    portal = None
    if token is not None:
        portal = PortalConfig(
            api_url=args.api_url,
            token=token,
            listen_port=server.listen_port,
            name=args.name,
            public_ip4=server.public_ip4,
            public_ip6=server.public_ip6,
            token_in_query=args.token_in_query,
        )
        portal.url()  # ValueError names what is wrong with the URL
    xdp = None
    if args.ebpf_offloading and args.allocation_rate_limit:
        if args.ebpf_mandatory:
            raise ValueError(
                "--allocation-rate-limit relays in userspace: it cannot be combined with "
                "--ebpf-mandatory"
            )
        logging.getLogger("relay").warning(
            "--allocation-rate-limit: XDP offload stays off (the program cannot enforce "
            "per-allocation limits); relaying in userspace"
        )
    elif args.ebpf_offloading:
        xdp = XdpOptions(
            interface=args.ebpf_offloading,
            attach_mode=args.ebpf_attach_mode,
            public_ip4=server.public_ip4,
            public_ip6=server.public_ip6,
            interface_ip4=args.ebpf_int4_addr,
            interface_ip6=args.ebpf_int6_addr,
            listen_port=server.listen_port,
            lowest_port=server.lowest_port,
            highest_port=server.highest_port,
            mandatory=args.ebpf_mandatory,
        )
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        raise ValueError("TURN over TLS needs both --tls-cert-file and --tls-key-file")
    if args.tls_cert_file is not None:
        from firezone_relay.actors.tls import TlsConfigError, build_context

        try:
            build_context(args.tls_cert_file, args.tls_key_file)
        except TlsConfigError as exc:
            raise ValueError(str(exc)) from None
        if args.tls_listen_port == server.listen_port and not args.no_tcp:
            raise ValueError("--tls-listen-port must differ from the TCP --listen-port")
    defaults = StreamOptions()
    streams = StreamOptions(
        max_connections=args.max_stream_connections,
        max_per_source=args.max_stream_connections_per_source,
        proxy_from=tuple(args.proxy_protocol_from or ()),
        # the hidden --time-scale shortens these with the core's timers (tests)
        handshake_timeout=defaults.handshake_timeout * args.time_scale,
        idle_timeout=defaults.idle_timeout * args.time_scale,
    )
    return Settings(
        server=server,
        tcp=not args.no_tcp,
        tls_listen_port=args.tls_listen_port,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        streams=streams,
        portal=portal,
        xdp=xdp,
        bind_ip4=args.bind_ip4_addr,
        bind_ip6=args.bind_ip6_addr,
        rng_seed=args.rng_seed,
        auth_secret=secret.value if secret is not None else None,
        auth_secrets=secret.secrets if secret is not None else (),
        secret_origin=secret,
        admin=admin,
        admin_socket=admin_socket_path(args.control_endpoint, args.admin_socket),
        admin_socket_required=bool(args.admin_socket),
        otlp_grpc_endpoint=args.otlp_grpc_endpoint,
        health_check_addr=args.health_check_addr or None,
        control_endpoint=args.control_endpoint or None,
        resource_attributes=dict(getattr(args, "resource_attributes", {})),
    )


def _check_portal_pins(args: argparse.Namespace) -> None:
    """Portal mode serves connlib, which only speaks the ``firezone`` scheme in realm
    ``firezone``: anything else would lock every client out, so it is refused at start."""
    from firezone_relay.protocol.auth import FIREZONE_REALM

    if args.auth_scheme != "firezone":
        raise ValueError(
            f"AUTH_SCHEME / --auth-scheme {args.auth_scheme!r} cannot be used with "
            "FIREZONE_TOKEN: portal mode needs the firezone scheme (connlib's credentials)"
        )
    if args.realm != FIREZONE_REALM:
        raise ValueError(
            f"REALM / --realm {args.realm!r} cannot be used with FIREZONE_TOKEN: portal "
            f"mode needs realm {FIREZONE_REALM!r} (connlib signs with it)"
        )


#: allocation ports below this are the system's service ports
_LOWEST_ALLOCATION_PORT = 1024


def _check_ports(args: argparse.Namespace) -> None:
    """The allocation range: above the service ports, ordered, and apart from the listen port."""
    low, high, listen = args.lowest_port, args.highest_port, args.listen_port
    if low < _LOWEST_ALLOCATION_PORT:
        raise ValueError(
            f"--lowest-port {low}: allocation ports start at {_LOWEST_ALLOCATION_PORT} or above "
            "(below are the system's service ports; the default is 49152)"
        )
    if low > high:
        raise ValueError(f"bad allocation port range: --lowest-port {low} > --highest-port {high}")
    if low <= listen <= high:
        raise ValueError(
            f"--listen-port {listen} is inside the allocation range --lowest-port {low} .. "
            f"--highest-port {high}: move one of them"
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from firezone_relay.actors.subcommands import run_subcommand

    code = run_subcommand(argv)
    if code is not None:
        return code
    parser = build_parser()
    args = parser.parse_args(argv)
    datapath = os.environ.get("RELAY_DATAPATH", "auto").strip().lower() or "auto"
    if datapath not in ("auto", "python"):
        parser.error(f"RELAY_DATAPATH: {datapath!r} is not one of auto, python")

    from firezone_relay.actors.logs import configure

    log_filter = configure(args.log_format, args.log_filter)
    install_startup_handlers()
    warn_unsupported(args)
    discover(args)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    warn_doubtful(args)
    import logging

    logging.getLogger("relay").info(
        "firezone-relay starting (rng seed %s)",
        args.rng_seed if args.rng_seed is not None else "from entropy",
    )
    workers = args.num_worker_threads
    if workers > 1:
        if workers > args.highest_port - args.lowest_port + 1:
            parser.error(
                f"--num-worker-threads {workers}: more workers than allocation ports "
                f"(--lowest-port {args.lowest_port} .. --highest-port {args.highest_port})"
            )
        from firezone_relay.actors.supervisor import run_supervised

        code = run_supervised(settings, log_filter, workers, args.log_format)
    else:
        from firezone_relay.actors.daemon import run

        code = run(settings, log_filter)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Non-daemon threads (a stuck exporter, a bcc call) must not hold the exit past the budget.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
