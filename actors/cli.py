"""``firezone-relay``: the reference relay's flags and environment variables, plus standalone mode.

``firezone-relay --public-ip4-addr 127.0.0.1 --allow-loopback-peers`` runs a TURN server on a
laptop: with no portal token the relay is standalone, and its credential secret comes from
``--auth-secret`` (``AUTH_SECRET``) or is generated and logged once.
``firezone-relay credentials --auth-secret S`` prints a username and password it accepts.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {str(text)!r}") from None


@_validator
def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {str(text)!r}") from None


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firezone-relay",
        description="STUN/TURN relay, Firezone-compatible; standalone TURN server without a token. "
        "`firezone-relay credentials --help` mints credentials.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a("--version", action="version", version=f"%(prog)s {relay_version()}")
    a(
        "token",
        nargs="?",
        type=_text,
        default=_env("FIREZONE_TOKEN"),
        metavar="TOKEN",
        help="portal token (or a file holding it); none = standalone mode",
    )
    a(
        "name",
        nargs="?",
        type=_text,
        default=_env("FIREZONE_NAME"),
        metavar="NAME",
        help="relay name for the portal",
    )
    a(
        "--public-ip4-addr",
        type=_ip(4),
        default=_env("PUBLIC_IP4_ADDR"),
        help="public IPv4 address",
    )
    a(
        "--public-ip6-addr",
        type=_ip(6),
        default=_env("PUBLIC_IP6_ADDR"),
        help="public IPv6 address",
    )
    a("--listen-port", type=_port, default=_env("LISTEN_PORT", 3478))
    a("--lowest-port", type=_port, default=_env("LOWEST_PORT", 49152))
    a("--highest-port", type=_port, default=_env("HIGHEST_PORT", 65535))
    a("--bind-ip4-addr", type=_ip(4), default=_env("BIND_IP4_ADDR", "0.0.0.0"))
    a("--bind-ip6-addr", type=_ip(6), default=_env("BIND_IP6_ADDR", "::"))
    a("--api-url", type=_text, default=_env("FIREZONE_API_URL"), help="portal URL")
    a(
        "--rng-seed",
        type=_int,
        default=_env("RNG_SEED"),
        help="make port choice deterministic (tests); secrets and nonces always come from the OS",
    )
    a(
        "--log-format",
        choices=("human", "json"),
        type=_one_of("human", "json"),
        default=_env("LOG_FORMAT", "human"),
    )
    a(
        "--log-filter",
        type=_text,
        default=_env("RUST_LOG", "info"),
        help="log directives, e.g. 'info,relay=debug'",
    )
    a(
        "--otlp-grpc-endpoint",
        type=_text,
        default=_env("OTLP_GRPC_ENDPOINT"),
        help="host:port of an OTLP/gRPC collector for traces and metrics",
    )
    a("--ebpf-offloading", type=_text, default=_env("EBPF_OFFLOADING"), metavar="IFACE")
    a(
        "--ebpf-attach-mode",
        choices=("driver", "generic"),
        type=_one_of("driver", "generic"),
        default=_env("EBPF_ATTACH_MODE", "driver"),
    )
    a(
        "--ebpf-mandatory",
        action="store_true",
        default=_env_bool("EBPF_MANDATORY"),
        help="exit instead of relaying in userspace when XDP offload cannot start",
    )
    a("--ebpf-int4-addr", type=_ip(4), default=_env("EBPF_INT4_ADDR"))
    a("--ebpf-int6-addr", type=_ip(6), default=_env("EBPF_INT6_ADDR"))
    a("--health-check-addr", type=_host_port, default=_env("HEALTH_CHECK_ADDR", "0.0.0.0:8080"))
    a("--control-endpoint", type=_host_port, default=_env("CONTROL_ENDPOINT", "127.0.0.1:9999"))
    a(
        "--admin-socket",
        type=_text,
        default=_env("ADMIN_SOCKET"),
        metavar="PATH",
        help="the Unix socket of the operator verbs (sessions, disconnect, drain, reload, top); "
        "default /run/firezone-relay/control-<port of --control-endpoint>.sock",
    )
    a(
        "--allocation-rate-limit",
        type=_positive,
        default=_env("ALLOCATION_RATE_LIMIT"),
        metavar="BYTES_PER_S",
        help="relayed bytes per second per allocation, each direction (excess dropped); "
        "relays in userspace only (no XDP, no C route mirror)",
    )
    a(
        "--auth-secret-file",
        type=_text,
        default=_env("AUTH_SECRET_FILE"),
        metavar="FILE",
        help="credential secrets, one per line: all accepted, the first signs new credentials; "
        "re-read by `firezone-relay reload` and SIGHUP",
    )
    a(
        "--peer-list-file",
        type=_text,
        default=_env("PEER_LIST_FILE"),
        metavar="FILE",
        help="lines 'allow CIDR' / 'deny CIDR' added to --allowed-peer-ip / --denied-peer-ip; "
        "re-read by reload",
    )
    # standalone TURN server options
    a("--auth-secret", type=_text, default=_env("AUTH_SECRET"), help="credential secret")
    a(
        "--auth-scheme",
        choices=("firezone", "rest"),
        type=_one_of("firezone", "rest"),
        default=_env("AUTH_SCHEME", "firezone"),
        help="firezone: <expiry>:<salt> / SHA-256; rest: coturn use-auth-secret",
    )
    a("--realm", type=_text, default=_env("REALM", "firezone"))
    a("--allow-loopback-peers", action="store_true", default=_env_bool("ALLOW_LOOPBACK_PEERS"))
    a(
        "--allow-private-peers",
        action="store_true",
        default=_env_bool("ALLOW_PRIVATE_PEERS"),
        help="allow private and CGNAT peers (always on in portal mode, as Firezone's relay)",
    )
    a(
        "--allowed-peer-ip",
        action=_AppendPeerIp,
        type=_peer_ips,
        default=_env("ALLOWED_PEER_IP", []),
        metavar="CIDR",
        help="always allow peers in CIDR (repeatable; overrides --denied-peer-ip and the "
        "built-in refusals, e.g. 203.0.113.0/24 for Firezone's lab; env: comma-separated)",
    )
    a(
        "--denied-peer-ip",
        action=_AppendPeerIp,
        type=_peer_ips,
        default=_env("DENIED_PEER_IP", []),
        metavar="CIDR",
        help="refuse peers in CIDR (repeatable; env: comma-separated)",
    )
    a(
        "--max-allocations",
        type=_positive,
        default=_env("MAX_ALLOCATIONS"),
    )
    a(
        "--max-allocations-per-user",
        type=_positive,
        default=_env("MAX_ALLOCATIONS_PER_USER"),
    )
    single = p.add_mutually_exclusive_group()
    single.add_argument(
        "--single-allocation-per-username",
        dest="single_allocation_per_username",
        action="store_const",
        const=True,
        help="a new Allocate frees the username's previous allocation (default with the "
        "firezone scheme)",
    )
    single.add_argument(
        "--no-single-allocation-per-username",
        dest="single_allocation_per_username",
        action="store_const",
        const=False,
        help="let one username hold several allocations, as WebRTC apps that share one "
        "credential across peer connections need (default with the rest scheme)",
    )
    p.set_defaults(single_allocation_per_username=_env_tristate("SINGLE_ALLOCATION_PER_USERNAME"))
    a(
        "--unauthenticated-rate-limit",
        type=_float,
        default=_env("UNAUTHENTICATED_RATE_LIMIT"),
        metavar="PER_SECOND",
        help="answers per second (burst: twice that) to one source IP before it authenticates "
        "(Binding, 401 challenges, errors): limits reflection; default no limit",
    )
    a(  # hidden: real-time expiry tests and simulations only
        "--time-scale",
        type=_float,
        default=_env("TIME_SCALE", 1.0),
        help=argparse.SUPPRESS,
    )
    a(
        "--token-in-query",
        action="store_true",
        default=_env_bool("TOKEN_IN_QUERY"),
        help="also send the portal token as the legacy `token` query parameter",
    )
    a(
        "--max-channels-per-allocation",
        type=_positive,
        default=_env("MAX_CHANNELS_PER_ALLOCATION"),
        help="channels (bound or cooling down) per allocation; default 1024 standalone, "
        "and in portal mode the whole channel-number space (4096), so connlib never meets it",
    )
    a(
        "--max-permissions-per-allocation",
        type=_positive,
        default=_env("MAX_PERMISSIONS_PER_ALLOCATION", 1024),
    )
    _add_firezone_extras(p)
    _show_env(p)
    return p


#: Flags whose environment variable is not the flag's name in upper case (clap's rule).
_ENV_NAMES = {
    "token": "FIREZONE_TOKEN",
    "name": "FIREZONE_NAME",
    "api_url": "FIREZONE_API_URL",
    "log_filter": "RUST_LOG",
    "telemetry": "TELEMETRY, FIREZONE_TELEMETRY",
}


def _add_firezone_extras(p: argparse.ArgumentParser) -> None:
    """Firezone's flags that mean nothing here (accepted so a Firezone deployment's command
    line and environment start this relay unchanged; see ``warn_unsupported``), and the
    cloud metadata discovery its ``docker-init-relay.sh`` does around the binary."""
    a = p.add_argument
    a(
        "--telemetry",
        action="store_true",
        default=_env_bool("TELEMETRY") or _env_bool("FIREZONE_TELEMETRY"),
        help="Firezone's Sentry crash reporting: accepted and ignored",
    )
    a(
        "--num-worker-threads",
        type=_positive,
        default=_env("NUM_WORKER_THREADS"),
        help="Firezone's tokio worker threads: accepted and ignored (one event loop here)",
    )
    a(
        "--google-cloud-project-id",
        type=_text,
        default=_env("GOOGLE_CLOUD_PROJECT_ID"),
        help="Firezone's project ID for Google Cloud log records: accepted and ignored",
    )
    a(
        "--listen-address-discovery-method",
        choices=("gce_metadata", "aws_ec2_metadata"),
        type=_one_of("gce_metadata", "aws_ec2_metadata"),
        default=_env("LISTEN_ADDRESS_DISCOVERY_METHOD"),
        help="fill a missing --public-ip4-addr/--public-ip6-addr from the cloud's metadata "
        "service (endpoint: GCE_METADATA_HOST, AWS_EC2_METADATA_SERVICE_ENDPOINT)",
    )
    a(
        "--otel-metadata-discovery-method",
        choices=("gce_metadata",),
        type=_one_of("gce_metadata"),
        default=_env("OTEL_METADATA_DISCOVERY_METHOD"),
        help="add service.instance.id, gcp.gce.instance.name and cloud.region from the "
        "metadata service to the OpenTelemetry resource",
    )
    p.set_defaults(resource_attributes={})


class _HelpFormatter(argparse.HelpFormatter):
    """Never wraps inside ``[env: NAME]``, so the names can be grepped from ``--help``."""

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
    if args.num_worker_threads is not None:
        log.warning(
            "--num-worker-threads (NUM_WORKER_THREADS) is ignored: this relay runs one event "
            "loop, and XDP (--ebpf-offloading) is how it scales across cores"
        )
    if args.google_cloud_project_id:
        log.warning(
            "--google-cloud-project-id (GOOGLE_CLOUD_PROJECT_ID) is ignored: there is no "
            "google-cloud log format (Firezone removed it too)"
        )


def credentials_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firezone-relay credentials",
        description="Print a TURN username and password that a relay with this secret accepts.",
    )
    secret = p.add_mutually_exclusive_group(
        required=_env("AUTH_SECRET") is None and _env("AUTH_SECRET_FILE") is None
    )
    secret.add_argument("--auth-secret", type=_text, default=_env("AUTH_SECRET"))
    secret.add_argument(
        "--auth-secret-file",
        type=_text,
        default=_env("AUTH_SECRET_FILE"),
        metavar="FILE",
        help="the relay's secret file: its first secret signs",
    )
    p.add_argument(
        "--auth-scheme",
        choices=("firezone", "rest"),
        type=_one_of("firezone", "rest"),
        default=_env("AUTH_SCHEME", "firezone"),
    )
    p.add_argument("--ttl", type=_positive, default=3600, help="seconds until expiry")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--salt", help="firezone scheme: the salt (default: random)")
    who.add_argument("--user", help="rest scheme: the user name (default: random)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def credentials_main(argv: Sequence[str]) -> int:
    from firezone_relay.protocol.auth import make_credentials

    parser = credentials_parser()
    args = parser.parse_args(argv)
    if args.auth_secret_file and not (args.auth_secret and "--auth-secret" in argv):
        from firezone_relay.actors.admin import read_secret_file

        try:
            args.auth_secret = read_secret_file(args.auth_secret_file)[0]
        except ValueError as exc:
            parser.error(str(exc))
    user = args.salt or args.user or secrets.token_urlsafe(12)
    expiry = int(time.time()) + args.ttl
    username, password = make_credentials(args.auth_scheme, args.auth_secret, expiry, user)
    if args.json:
        print(json.dumps({"username": username, "password": password, "expiry": expiry}))
    else:
        print(f"username={username}")
        print(f"password={password}")
    return 0


def systemd_unit_main(argv: Sequence[str]) -> int:
    """Print the systemd unit (or, with ``--env``, its environment file) shipped in the
    package, to be copied to ``/etc/systemd/system/``."""
    from importlib.resources import files

    p = argparse.ArgumentParser(prog="firezone-relay systemd-unit", description=__doc__)
    p.add_argument("--env", action="store_true", help="print the example environment file")
    args = p.parse_args(argv)
    name = "firezone-relay.env" if args.env else "firezone-relay.service"
    sys.stdout.write(files("firezone_relay.actors").joinpath("systemd", name).read_text())
    return 0


def _read_token(value: str | None) -> str | None:
    """The token, or the contents of the file it names (as docker-init-relay.sh allows)."""
    if not value:
        return None
    path = Path(value)
    if len(value) < 4096 and "/" in value and path.is_file():
        return path.read_text().strip() or None
    return value


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


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The one place a parsed command line becomes configuration: the core's
    ``ServerConfig``, the portal's ``PortalConfig`` and the XDP manager's ``XdpOptions`` are
    built here, once, from values the flags' validators already checked (environment
    defaults included). Cross-flag checks raise ValueError (``main`` exits 2 with it)."""
    from firezone_relay.actors.admin import (
        AdminConfig,
        admin_socket_path,
        read_peer_list_file,
    )
    from firezone_relay.actors.daemon import Settings
    from firezone_relay.actors.portal import PortalConfig
    from firezone_relay.actors.xdp_manager import XdpOptions
    from firezone_relay.protocol.channel_data import CHANNEL_NUMBERS
    from firezone_relay.protocol.server import ServerConfig

    if args.public_ip4_addr is None and args.public_ip6_addr is None:
        raise ValueError(
            "Must listen on at least one of IPv4 or IPv6 (--public-ip4-addr / --public-ip6-addr)"
        )
    token = _read_token(args.token)
    if token is not None and not args.api_url:
        raise ValueError("a portal token needs --api-url / FIREZONE_API_URL")
    if token is not None:
        _check_portal_pins(args)
    max_channels = args.max_channels_per_allocation
    if max_channels is None:
        max_channels = CHANNEL_NUMBERS if token is not None else 1024
    admin = AdminConfig(
        auth_secret_file=args.auth_secret_file or None,
        peer_list_file=args.peer_list_file or None,
        allowed_peer_ips=tuple(args.allowed_peer_ip or ()),
        denied_peer_ips=tuple(args.denied_peer_ip or ()),
    )
    auth_secrets = _auth_secrets(args, token is not None)
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
    return Settings(
        server=server,
        portal=portal,
        xdp=xdp,
        bind_ip4=args.bind_ip4_addr,
        bind_ip6=args.bind_ip6_addr,
        rng_seed=args.rng_seed,
        auth_secret=auth_secrets[0] if auth_secrets else args.auth_secret,
        auth_secrets=auth_secrets,
        admin=admin,
        admin_socket=admin_socket_path(args.control_endpoint, args.admin_socket),
        admin_socket_required=bool(args.admin_socket),
        otlp_grpc_endpoint=args.otlp_grpc_endpoint,
        health_check_addr=args.health_check_addr or None,
        control_endpoint=args.control_endpoint or None,
        resource_attributes=dict(getattr(args, "resource_attributes", {})),
    )


def _auth_secrets(args: argparse.Namespace, portal: bool) -> tuple[str, ...]:
    """The secrets of ``--auth-secret-file`` (standalone only; not with ``--auth-secret``)."""
    if not args.auth_secret_file:
        return ()
    if args.auth_secret:
        raise ValueError("give --auth-secret or --auth-secret-file, not both")
    if portal:
        raise ValueError("--auth-secret-file is for standalone mode (the portal gets its own)")
    from firezone_relay.actors.admin import read_secret_file

    return read_secret_file(args.auth_secret_file)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from firezone_relay.actors.admin_cli import VERBS

    if argv[:1] and argv[0] in VERBS:
        return VERBS[argv[0]](argv[1:])
    if argv[:1] == ["credentials"]:
        return credentials_main(argv[1:])
    if argv[:1] == ["systemd-unit"]:
        return systemd_unit_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    datapath = os.environ.get("RELAY_DATAPATH", "auto").strip().lower() or "auto"
    if datapath not in ("auto", "python"):
        parser.error(f"RELAY_DATAPATH: {datapath!r} is not one of auto, python")

    from firezone_relay.actors.logs import configure

    log_filter = configure(args.log_format, args.log_filter)
    warn_unsupported(args)
    discover(args)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    import logging

    logging.getLogger("relay").info(
        "firezone-relay starting (rng seed %s)",
        args.rng_seed if args.rng_seed is not None else "from entropy",
    )
    from firezone_relay.actors.daemon import run

    code = run(settings, log_filter)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Non-daemon threads (a stuck exporter, a bcc call) must not hold the exit past the budget.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
