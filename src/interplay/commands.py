"""Commands' replies: their shape, and how a workflow step's reply is journaled.

A reply's payload is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
<Failure as a dict>}``. A reply to a workflow step carries the run and step in its
``x-run`` / ``x-key`` headers and is journaled in the transaction that receives it
(or, when the workflow runs in the same process as the service, in the service's
own transaction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import StepFailed
from .message import Message
from .stores import workflows as ops
from .stores.messaging import WAKE, Emitter

__all__ = ["CANCEL", "is_workflow_reply", "recorder", "reply_body", "reply_error", "reply_result"]

CANCEL = "interplay.cancel"
"""The type of the control message that tells an orchestrator to cancel a run."""


def reply_body(ok: bool, value: Any) -> dict[str, Any]:
    """The payload of a command's reply: ``{"ok": true, "result": ...}`` or an error."""
    return {"ok": True, "result": value} if ok else {"ok": False, "error": value}


def reply_error(body: Any) -> dict[str, Any]:
    """The ``Failure`` of an error reply, as a dict ({} when there is none)."""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def reply_result(target: str, body: Any) -> Any:
    """The result a reply carries, or the StepFailed it stands for."""
    if isinstance(body, dict) and body.get("ok"):
        return body.get("result")
    error = reply_error(body)
    raise StepFailed(target, str(error.get("error_type", "Error")), str(error.get("error", body)), error)


def is_workflow_reply(msg: Message) -> bool:
    """A command's reply to a workflow step (to journal when it is received)."""
    return msg.kind == "reply" and "x-run" in msg.headers and msg.type not in (WAKE, CANCEL)


def recorder(msg: Message, now: float) -> Callable[[Emitter], None]:
    """An op part that journals a workflow step's reply (in the receiving transaction)."""
    body = msg.payload if isinstance(msg.payload, dict) else {}
    ok = bool(body.get("ok"))
    error = reply_error(body)
    run_id, key = msg.headers["x-run"], int(msg.headers.get("x-key", "-1"))

    def record(em: Emitter) -> None:
        ops.record_reply(
            em.tx, run_id, key, ok, body.get("result") if ok else error,
            None if ok else str(error.get("error_type")), None if ok else str(error.get("error")), now,
        )

    return record
