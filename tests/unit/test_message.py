"""The envelope: encoding, strict decoding, ids."""

from __future__ import annotations

import pickle
import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interplay import Message, MessageDecodeError
from interplay.message import new_id


def test_round_trip_keeps_every_field() -> None:
    msg = Message(
        type="order.created", payload={"id": 1, "items": [1, 2]}, kind="event", flow_id="f-1",
        causation_id="c-1", source="orders", attempt=2, headers={"traceparent": "00-abc"},
    )
    back = Message.decode(msg.encode())
    assert back == msg


def test_new_message_starts_its_own_flow() -> None:
    msg = Message(type="order.created")
    assert msg.flow_id == msg.id
    child = msg.caused("payment.completed", {"ok": True}, source="payments")
    assert child.flow_id == msg.flow_id
    assert child.causation_id == msg.id
    assert child.id != msg.id


def test_ids_are_uuid7_and_time_ordered() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'v'"),
        (orjson.dumps({"v": 99}), "version 99 is not supported"),
        (orjson.dumps({"v": 1, "kind": "gossip"}), "'kind' must be one of"),
        (
            orjson.dumps({"v": 1, "kind": "event", "type": "x", "flow_id": "f", "id": "i", "time": 1,
                          "headers": {"a": 1}, "payload": None}),
            "'headers' must map strings to strings",
        ),
        (
            orjson.dumps({"v": 1, "kind": "event", "type": "x", "flow_id": "f", "id": "i", "time": "now",
                          "payload": None}),
            "'time' is missing or not a number",
        ),
        (
            orjson.dumps({"v": 1, "kind": "event", "type": "", "flow_id": "f", "id": "i", "time": 1,
                          "payload": None}),
            "'type' is empty",
        ),
        (
            orjson.dumps({"v": 1, "kind": "event", "type": "x", "flow_id": "f", "id": "i", "time": 1}),
            "'payload' is missing",
        ),
    ],
)
def test_decode_says_what_is_wrong(data: bytes, complaint: str) -> None:
    with pytest.raises(MessageDecodeError, match=complaint):
        Message.decode(data)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_refused_unread(protocol: int) -> None:
    with pytest.raises(MessageDecodeError, match="pickle"):
        Message.decode(pickle.dumps({"v": 1}, protocol=protocol))


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_decode_errors(data: bytes) -> None:
    try:
        Message.decode(data)
    except MessageDecodeError:
        pass


_scalar = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
)
_json = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Each field: usually a plausible value, sometimes junk, sometimes absent - so the
# decoder is driven past its first check as well as stopped at each one.
_fields = {
    "v": st.just(1) | _scalar,
    "id": st.text(min_size=1, max_size=8) | _scalar,
    "kind": st.sampled_from(["event", "command", "reply"]) | _scalar,
    "type": st.text(max_size=8) | _scalar,
    "flow_id": st.text(max_size=8) | _scalar,
    "causation_id": st.none() | st.text(max_size=8) | _scalar,
    "source": st.none() | st.text(max_size=8) | _scalar,
    "time": st.floats(min_value=0, max_value=2e9) | _scalar,
    "attempt": st.integers(min_value=-2, max_value=5) | _scalar,
    "headers": st.dictionaries(st.text(max_size=4), st.text(max_size=4) | _scalar, max_size=3) | _scalar,
    "payload": _json,
}


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_fields))
def test_arbitrary_envelopes_decode_or_raise_typed_errors(obj: dict[str, object]) -> None:
    try:
        msg = Message.decode(orjson.dumps(obj))
    except MessageDecodeError:
        return
    assert Message.decode(msg.encode()) == msg
