"""``--log-format json`` prints what Firezone's relay prints (tracing-subscriber's JSON layer,
``fmt::layer().json()`` in ``rust/relay/server/src/main.rs``), compared field by field with
lines in that shape (``tests/data/firezone_relay_json_logs.jsonl``, written from the events of
``rust/relay/proto/src/server.rs`` as the JSON layer serialises them); structured values go
in ``fields``, never into the message as Python tuples."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from firezone_relay.actors.logs import HumanFormatter, JsonFormatter
from firezone_relay.protocol.types import log_fields

FIREZONE = [
    json.loads(line)
    for line in (Path(__file__).parents[1] / "data" / "firezone_relay_json_logs.jsonl")
    .read_text()
    .splitlines()
]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LEVELS = {"TRACE", "DEBUG", "INFO", "WARN", "ERROR"}


def check_firezone_shape(line: dict[str, Any]) -> None:
    """What every line of the JSON layer has, in its order, with its types."""
    keys = list(line)
    assert keys[:4] == ["timestamp", "level", "fields", "target"], keys
    assert keys[4:] in ([], ["span", "spans"]), keys
    assert TIMESTAMP.match(line["timestamp"]), line["timestamp"]
    assert line["level"] in LEVELS
    fields = line["fields"]
    assert next(iter(fields)) == "message" and isinstance(fields["message"], str)
    assert all(isinstance(v, str) for v in fields.values()), fields
    assert isinstance(line["target"], str) and "." not in line["target"]
    if "span" in line:
        assert line["span"]["name"] and list(line["span"])[-1] == "name"
        assert line["spans"][-1] == line["span"]


def test_the_reference_lines_have_the_shape() -> None:
    for line in FIREZONE:
        check_firezone_shape(line)


def _format(formatter: logging.Formatter, level: int, msg: str, *args: object, **kw: Any) -> str:
    logger = logging.getLogger("relay")
    record = logger.makeRecord("relay", level, __file__, 1, msg, args, None, extra=kw or None)
    return formatter.format(record)


def test_json_lines_match_firezone_field_by_field() -> None:
    bound = FIREZONE[1]
    ours = json.loads(
        _format(
            JsonFormatter(),
            logging.INFO,
            "bound channel %#06x",
            0x4000,
            **log_fields(
                sender=("203.0.113.7", 52625),
                allocation=49152,
                peer=("198.51.100.20", 51820),
                channel=0x4000,
            ),
        )
    )
    check_firezone_shape(ours)
    assert list(ours) == list(bound)
    assert ours["level"] == bound["level"] and ours["target"] == bound["target"]
    assert list(ours["fields"]) == list(bound["fields"])
    for name in ("sender", "allocation", "peer", "channel"):
        assert ours["fields"][name] == bound["fields"][name], name
    assert "(" not in ours["fields"]["message"]  # no tuple in the text
    v6 = log_fields(sender=("2001:db8::7", 52625))["fields"]["sender"]
    assert v6 == FIREZONE[3]["fields"]["sender"]


def test_levels_are_tracings() -> None:
    seen = {
        json.loads(_format(JsonFormatter(), level, "x"))["level"]
        for level in (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 50)
    }
    assert seen == LEVELS


def test_a_current_span_is_shown_as_the_json_layer_shows_it() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("allocation.create", attributes={"client.port": 52625}):
        line = json.loads(_format(JsonFormatter(), logging.INFO, "inside"))
    check_firezone_shape(line)
    assert line["span"] == {"client.port": 52625, "name": "allocation.create"}
    assert line["spans"] == [line["span"]]
    assert "span" not in json.loads(_format(JsonFormatter(), logging.INFO, "outside"))


def test_human_lines_append_the_fields() -> None:
    line = _format(
        HumanFormatter(), logging.WARNING, "send failed", **log_fields(recipient=("::1", 5))
    )
    assert line.endswith(" WARN relay: send failed recipient=[::1]:5")


def test_an_exception_is_a_field() -> None:
    stream = io.StringIO()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("relay").makeRecord(
            "relay", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info()
        )
    stream.write(JsonFormatter().format(record))
    line = json.loads(stream.getvalue())
    check_firezone_shape(line)
    assert "ValueError: boom" in line["fields"]["error"]
