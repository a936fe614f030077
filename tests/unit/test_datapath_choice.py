"""Which userspace data path runs (actors/udpio.py ``choose``): the compiled helper when it is
installed and speaks these sources' API version, the pure-Python fallback otherwise or when
``RELAY_DATAPATH=python`` forces it; every fallback says why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from firezone_relay.actors import udpio
from tests.required import REQUIRE_ALL


def compiled(version: object) -> SimpleNamespace:
    """A stand-in for an installed module (only its attributes are read)."""
    return SimpleNamespace(API_VERSION=version, Receiver=object, send_batch=print)


def test_the_matching_compiled_helper_is_used() -> None:
    module = compiled(udpio.API_VERSION)
    name, why, receiver, send = udpio.choose("auto", module)
    assert (name, receiver, send) == ("compiled", object, print)
    assert why == f"API version {udpio.API_VERSION}"


def test_the_environment_forces_the_fallback() -> None:
    name, why, receiver, send = udpio.choose("python", compiled(udpio.API_VERSION))
    assert (name, receiver, send) == ("python", udpio.PyReceiver, udpio.py_send_batch)
    assert why == "forced by RELAY_DATAPATH=python"


def test_without_the_compiled_helper_python_runs() -> None:
    name, why, receiver, _ = udpio.choose("auto", None)
    assert (name, receiver) == ("python", udpio.PyReceiver)
    assert why == "the compiled helper is not installed"


@pytest.mark.parametrize("version", [udpio.API_VERSION + 1, 0, None, "1"])
def test_a_stale_compiled_helper_is_not_used(version: object) -> None:
    module = compiled(version)
    if version is None:
        del module.API_VERSION  # a build from before the version existed
    name, why, receiver, _ = udpio.choose("auto", module)
    assert (name, receiver) == ("python", udpio.PyReceiver)
    assert f"API version {version!s}" in why and "reinstall" in why


def test_the_installed_helper_matches_these_sources() -> None:
    """The module this test run imports: where the helper is built it must be the one used
    (a stale or mismatched build would silently cost the fast path)."""
    try:
        from firezone_relay.actors import _udpio  # type: ignore[attr-defined]
    except ImportError:
        if REQUIRE_ALL:
            pytest.fail("the compiled helper (firezone_relay.actors._udpio) is not installed")
        pytest.skip("the compiled helper is not built here")
    assert _udpio.API_VERSION == udpio.API_VERSION
