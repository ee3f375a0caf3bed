"""The op that announces stuck flows: mark each one, and emit its event, in one transaction.

Every process that watches for stuck flows may find the same overdue flow at the same
moment. The mark is a conditional update (``stuck_at IS NULL``), so exactly one
transaction wins it - SQLite runs write transactions one at a time, and PostgreSQL
re-checks the condition after waiting for a concurrent writer's row lock - and only
the winner emits the event, in the same transaction: announced once, never lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..message import Message
from .messaging import Delivery, Emitter, Relay
from .records import Outgoing
from .schema import FLOW_STATUS
from .tx import Tx

__all__ = ["announce_stuck"]

_MARK = (
    f"UPDATE ip_flows SET stuck_at = ? WHERE flow_id = ? AND stuck_at IS NULL AND ({FLOW_STATUS}) = 'stuck' "
    "RETURNING last_type, pending"
)


def announce_stuck(
    tx: Tx,
    now: float,
    messages: Sequence[Message],
    delivery: Delivery,
    outgoing: Callable[[Message], Outgoing],
) -> tuple[list[Message], Relay]:
    """Mark each message's flow announced and emit the message, for flows still stuck and unmarked.

    ``messages`` are the events prepared for overdue flows (one per flow, ``flow_id``
    set, payload a dict). Their ``last_step`` and ``pending`` are refreshed from the
    flow's record as the mark reads it. Returns the messages emitted (those whose mark
    this transaction won) and what the caller must relay to the bus.
    """
    emitter = Emitter(tx, now, delivery)
    emitted: list[Message] = []
    restore: list[tuple[Any, str]] = []
    for msg in messages:
        row = tx.one(_MARK, (now, msg.flow_id, now))
        if row is None:  # another process announced it, or the flow moved on meanwhile
            continue
        if isinstance(msg.payload, dict):
            msg.payload = {**msg.payload, "last_step": row[0], "pending": int(row[1])}
        emitter.emit([outgoing(msg)])
        emitted.append(msg)
        restore.append((row[0], msg.flow_id))
    emitter.changes.apply(tx, now)
    # The announcement is an observation about the flow, not a step of it: the flow's
    # last step stays the one it reached (what `interplay flows --status stuck` shows).
    for last_type, flow_id in restore:
        tx.execute("UPDATE ip_flows SET last_type = ? WHERE flow_id = ?", (last_type, flow_id))
    return emitted, emitter.relay
