"""Cloud metadata discovery: what Firezone's ``docker-init-relay.sh`` does around its binary.

``LISTEN_ADDRESS_DISCOVERY_METHOD`` fills a missing public IPv4/IPv6 address from the
instance metadata service, so one deployment template works for every instance:

* ``gce_metadata``: ``GET /computeMetadata/v1/instance/network-interfaces/0/access-configs/0/
  external-ip`` and ``.../network-interfaces/0/ipv6s`` with ``Metadata-Flavor: Google``;
* ``aws_ec2_metadata``: IMDSv2, a session token from ``PUT /latest/api/token`` first, then
  ``GET /latest/meta-data/public-ipv4`` and ``/latest/meta-data/ipv6`` with that token.

``OTEL_METADATA_DISCOVERY_METHOD=gce_metadata`` adds ``service.instance.id``,
``gcp.gce.instance.name`` and ``cloud.region`` to the OpenTelemetry resource (``cloud.region``
holds the zone's name, as Firezone's script sets it, so dashboards keyed on it keep working).

Endpoints follow the clients' usual overrides, ``GCE_METADATA_HOST`` (``host[:port]``) and
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (a URL; ``AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6``
picks the IPv6 default). Proxies are never used: the service is link-local. Everything runs
before the event loop starts, bounded to ``TIMEOUT`` seconds overall (name resolution
included), so a relay outside that cloud fails fast with the reason instead of hanging.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["TIMEOUT", "MetadataError", "fill_public_ips", "otel_resource_attributes"]

log = logging.getLogger("relay.metadata")

#: seconds for the whole discovery, DNS included
TIMEOUT = 2.0
#: the largest answer read; metadata values are short
MAX_BODY = 4096

GCE_HOST = "metadata.google.internal"
GCE_ROOT = "/computeMetadata/v1/instance/"
GCE_IP4 = "network-interfaces/0/access-configs/0/external-ip"
GCE_IP6 = "network-interfaces/0/ipv6s"
AWS_ENDPOINT = "http://169.254.169.254"
AWS_ENDPOINT_V6 = "http://[fd00:ec2::254]"
#: the IMDSv2 session token's lifetime, seconds (what Firezone's script asks for)
AWS_TOKEN_TTL = 60

T = TypeVar("T")


class MetadataError(Exception):
    """The metadata service could not be reached, or did not answer like one."""


class _NotFound(Exception):
    """404: the instance has no such value (no public IPv6, say)."""


class _Http:
    """Plain HTTP to the metadata service: no proxy, a shared deadline, short bodies."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        expect: Mapping[str, str] | None = None,
    ) -> str:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise MetadataError(f"{method} {url}: no answer within {TIMEOUT:g} s")
        req = urllib.request.Request(url, method=method, headers=dict(headers))
        try:
            with self.opener.open(req, timeout=remaining) as response:
                body: bytes = response.read(MAX_BODY)
                got = {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound(url) from None
            raise MetadataError(f"{method} {url}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MetadataError(f"{method} {url}: {reason or type(exc).__name__}") from None
        for name, value in (expect or {}).items():
            if got.get(name.lower()) != value:
                raise MetadataError(
                    f"{method} {url}: not a metadata service (no '{name}: {value}' header)"
                )
        return body.decode("utf-8", "replace").strip()


def _bounded(what: str, timeout: float, work: Callable[[], T]) -> T:
    """Run ``work`` on a thread and give up after ``timeout``: getaddrinfo has no timeout,
    and a relay outside the cloud must not hang on resolving the metadata host."""
    values: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            values.append(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="metadata", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise MetadataError(f"{what}: no answer within {timeout:g} s")
    if errors:
        raise errors[0]
    return values[0]


def _gce_root(env: Mapping[str, str]) -> str:
    host = env.get("GCE_METADATA_HOST") or GCE_HOST
    base = host if "://" in host else f"http://{host}"
    return base.rstrip("/") + GCE_ROOT


def _aws_root(env: Mapping[str, str]) -> str:
    endpoint = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if not endpoint:
        mode = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").lower()
        endpoint = AWS_ENDPOINT_V6 if mode == "ipv6" else AWS_ENDPOINT
    base = endpoint if "://" in endpoint else f"http://{endpoint}"
    return base.rstrip("/")


def _address(text: str, version: int, source: str) -> str:
    """The first address in a metadata answer (``ipv6s`` may list several, or a prefix)."""
    first = text.split()[0].split("/")[0] if text.split() else ""
    try:
        address = ipaddress.ip_address(first)
    except ValueError:
        raise MetadataError(f"{source}: not an IPv{version} address: {text[:60]!r}") from None
    if address.version != version:
        raise MetadataError(f"{source}: not an IPv{version} address: {text[:60]!r}")
    return str(address)


def _lookup(
    method: str, want4: bool, want6: bool, env: Mapping[str, str], deadline: float
) -> tuple[str | None, str | None, list[str]]:
    """(IPv4, IPv6, what failed) for the families wanted."""
    http = _Http(deadline)
    if method == "gce_metadata":
        root = _gce_root(env)
        headers = {"Metadata-Flavor": "Google"}

        def get(path: str) -> str:
            return http.request("GET", root + path, headers, expect=headers)

        paths = {4: GCE_IP4, 6: GCE_IP6}
    elif method == "aws_ec2_metadata":
        root = _aws_root(env)
        token = http.request(
            "PUT",
            f"{root}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL)},
        )
        if not token:
            raise MetadataError(f"PUT {root}/latest/api/token: empty IMDSv2 token")
        headers = {"X-aws-ec2-metadata-token": token}

        def get(path: str) -> str:
            return http.request("GET", f"{root}/latest/meta-data/{path}", headers)

        paths = {4: "public-ipv4", 6: "ipv6"}
    else:
        raise MetadataError(f"unknown discovery method {method!r}")
    found: dict[int, str | None] = {4: None, 6: None}
    problems: list[str] = []
    for version, wanted in ((4, want4), (6, want6)):
        if not wanted:
            continue
        try:
            found[version] = _address(get(paths[version]), version, paths[version])
        except _NotFound:
            log.info("%s: this instance has no public IPv%d address", method, version)
        except MetadataError as exc:
            problems.append(str(exc))
    return found[4], found[6], problems


def fill_public_ips(
    method: str,
    ip4: str | None,
    ip6: str | None,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> tuple[str | None, str | None]:
    """``ip4``/``ip6`` with whichever was missing filled in from the metadata service.

    A family the service cannot tell is logged at WARN; MetadataError (with every reason) when
    the relay ends up with no public address at all."""
    env = os.environ if env is None else env
    if ip4 is not None and ip6 is not None:
        return ip4, ip6
    log.info("using %s to discover the public addresses", method)
    deadline = time.monotonic() + timeout
    try:
        found4, found6, problems = _bounded(
            method, timeout, lambda: _lookup(method, ip4 is None, ip6 is None, env, deadline)
        )
    except MetadataError as exc:
        found4, found6, problems = None, None, [str(exc)]
    for version, value in ((4, found4), (6, found6)):
        if value is not None:
            log.info("discovered PUBLIC_IP%d_ADDR %s (%s)", version, value, method)
    ip4, ip6 = ip4 or found4, ip6 or found6
    if ip4 is None and ip6 is None:
        why = "; ".join(problems) or "the metadata service knows no public address"
        raise MetadataError(f"{method}: no public IPv4 or IPv6 address found: {why}")
    for problem in problems:
        log.warning("%s: %s", method, problem)
    return ip4, ip6


def otel_resource_attributes(
    method: str, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
) -> dict[str, str]:
    """Resource attributes for this instance from the metadata service; MetadataError if it
    cannot tell them."""
    env = os.environ if env is None else env
    if method != "gce_metadata":
        raise MetadataError(f"unknown OTel metadata discovery method {method!r}")
    deadline = time.monotonic() + timeout
    root = _gce_root(env)
    headers = {"Metadata-Flavor": "Google"}

    def lookup() -> dict[str, str]:
        http = _Http(deadline)
        try:
            values = {
                key: http.request("GET", root + path, headers, expect=headers)
                for key, path in (("id", "id"), ("name", "name"), ("zone", "zone"))
            }
        except _NotFound as exc:
            raise MetadataError(f"GET {exc}: HTTP 404") from None
        return {
            "service.instance.id": values["id"],
            "gcp.gce.instance.name": values["name"],
            # "projects/<number>/zones/<zone>": Firezone's script keeps the last part
            "cloud.region": values["zone"].rsplit("/", 1)[-1],
        }

    return _bounded(method, timeout, lookup)
