"""Whether this run must have every tool (CI): then nothing may skip, xfail or fall back."""

from __future__ import annotations

import os

#: Set by ``.ci/run`` (and implied by ``CI``): every tool is installed, so a test that would
#: skip or xfail for want of one (coturn, Chromium, openssl, bcc, root) fails instead, and XDP
#: tests run the relay with ``--ebpf-mandatory``.
REQUIRE_ALL = os.environ.get("RELAY_TESTS_REQUIRE_ALL", "") not in ("", "0") or os.environ.get(
    "CI", ""
).lower() in ("1", "true", "yes")
