"""The one envelope for events, commands and replies, its ids and its JSON codec.

Every transport carries the same bytes: a JSON object with a schema version ``v``.
Decoding is strict and never executes anything: bytes that are not a valid envelope
raise :class:`~interplay.errors.MessageDecodeError` saying exactly what is wrong.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .errors import MessageDecodeError

__all__ = ["ENVELOPE_VERSION", "KINDS", "Message", "MessageKind", "new_id"]

ENVELOPE_VERSION = 1
"""The envelope schema this version writes; decoding refuses newer versions."""

MessageKind = Literal["event", "command", "reply", "workflow", "step"]
"""``event``, ``command`` and ``reply`` travel on the bus; ``workflow`` (a run's start)
and ``step`` (a workflow's local step) are records in the trace only."""
KINDS: frozenset[str] = frozenset({"event", "command", "reply"})
"""The kinds that travel on the bus (and that decoding accepts)."""

_id_lock = threading.Lock()
_last_ms = 0
_counter = 0
# Random bits for ids come from a generator seeded by the OS once (and again after a
# fork): ids must be unique, not unguessable, and a syscall per id costs too much.
_rand = random.Random(os.urandom(16))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _rand.seed(os.urandom(16)))


def new_id() -> str:
    """A UUIDv7 string (RFC 9562): time-ordered, so ids sort by creation time.

    Within one millisecond a 12-bit counter keeps the ids of this process increasing.
    """
    global _last_ms, _counter
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rand.getrandbits(10)  # start low: room to count up within the ms
        else:
            _counter += 1
            if _counter > 0xFFF:  # more than ~3000 ids in a millisecond: borrow the next one
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
        rand_b = _rand.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class Message:
    """One message on the bus.

    Attributes:
        type: the event name (``order.created``), the command (``payments.refund``),
            or for a reply the command it answers.
        payload: the body, already JSON-compatible (dicts, lists, strings, numbers).
        kind: ``event``, ``command`` or ``reply``.
        id: a UUIDv7; the key of de-duplication everywhere (inbox, broker, DLQ replay).
        flow_id: the business flow this message belongs to (correlation id).
        causation_id: the id of the message whose handling produced this one.
        source: the service (or ``workflow:NAME``) that sent it.
        time: when it was created, seconds since the epoch.
        attempt: how many times it has been delivered, starting at 1.
        headers: string metadata: W3C ``traceparent``, ``reply_to``, ...
    """

    type: str
    payload: Any = None
    kind: MessageKind = "event"
    id: str = field(default_factory=new_id)
    flow_id: str = ""
    causation_id: str | None = None
    source: str | None = None
    time: float = field(default_factory=time.time)
    attempt: int = 1
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.flow_id:
            self.flow_id = self.id

    def encode(self) -> bytes:
        """The envelope as JSON bytes (the wire and storage format)."""
        return orjson.dumps(
            {
                "v": ENVELOPE_VERSION,
                "id": self.id,
                "kind": self.kind,
                "type": self.type,
                "flow_id": self.flow_id,
                "causation_id": self.causation_id,
                "source": self.source,
                "time": self.time,
                "attempt": self.attempt,
                "headers": self.headers,
                "payload": self.payload,
            }
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview | str) -> Message:
        """Parse an envelope, refusing anything that is not one.

        Raises:
            MessageDecodeError: with what is wrong (not JSON, a missing or mistyped
                field, an unsupported version, pickle data, ...).
        """
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            data = bytes(data)
        if data[:1] == b"\x80":
            raise MessageDecodeError("pickle-encoded data is refused unread")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise MessageDecodeError(f"not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise MessageDecodeError(f"envelope must be a JSON object, got {type(obj).__name__}")
        version = obj.get("v")
        if type(version) is not int:
            raise MessageDecodeError("envelope field 'v' (schema version) is missing or not an int")
        if version > ENVELOPE_VERSION or version < 1:
            raise MessageDecodeError(
                f"envelope version {version} is not supported (this interplay reads 1..{ENVELOPE_VERSION})"
            )
        kind = _field(obj, "kind", str)
        if kind not in KINDS:
            raise MessageDecodeError(f"envelope field 'kind' must be one of {sorted(KINDS)}, got {kind!r}")
        headers = obj.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise MessageDecodeError("envelope field 'headers' must map strings to strings")
        when = obj.get("time")
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise MessageDecodeError("envelope field 'time' is missing or not a number")
        attempt = obj.get("attempt", 1)
        if type(attempt) is not int or attempt < 1:
            raise MessageDecodeError("envelope field 'attempt' must be a positive int")
        if "payload" not in obj:
            raise MessageDecodeError("envelope field 'payload' is missing")
        msg_id = _field(obj, "id", str)
        if not msg_id:
            raise MessageDecodeError("envelope field 'id' is empty")
        return cls(
            type=_nonempty(obj, "type"),
            payload=obj["payload"],
            kind=kind,
            id=msg_id,
            flow_id=_nonempty(obj, "flow_id"),
            causation_id=_optional(obj, "causation_id"),
            source=_optional(obj, "source"),
            time=float(when),
            attempt=attempt,
            headers=headers,
        )

    def caused(
        self,
        type: str,
        payload: Any,
        *,
        kind: MessageKind = "event",
        source: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """A new message in this message's flow, caused by it."""
        return Message(
            type=type,
            payload=payload,
            kind=kind,
            flow_id=self.flow_id,
            causation_id=self.id,
            source=source,
            headers=_propagated(self.headers) | (headers or {}),
        )


_PROPAGATED = ("traceparent", "tracestate")


def _propagated(headers: dict[str, str]) -> dict[str, str]:
    return {k: headers[k] for k in _PROPAGATED if k in headers}


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind):
        shown = "missing" if value is None else f"a {type(value).__name__}"
        raise MessageDecodeError(f"envelope field {name!r} must be a {kind.__name__}, got {shown}")
    return value


def _nonempty(obj: dict[str, Any], name: str) -> str:
    value: str = _field(obj, name, str)
    if not value:
        raise MessageDecodeError(f"envelope field {name!r} is empty")
    return value


def _optional(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise MessageDecodeError(f"envelope field {name!r} must be a string or null")
    return value
