"""The stuck-flow watch: a declared flow past its ``within`` is announced, once, as an event.

``app.flow("order", ..., within=60)`` promises that an order ends or fails within a
minute. A running app checks every ``RuntimeOptions.stuck_check_interval`` seconds
(on its clock) for flows that broke that promise and emits :data:`FLOW_STUCK` in each
such flow, with a :class:`FlowStuck` payload - an event like any other, so a service
can react to it (page someone, compensate, retry the last step)::

    @ops.on("interplay.flow.stuck")
    async def alert(stuck: FlowStuck) -> None: ...

Many processes may watch the same store; each stuck flow is announced by exactly one
of them (see :mod:`interplay.stores.stuck`). A flow may even declare
``fails="interplay.flow.stuck"`` to count as failed once it is announced stuck.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from ..message import Message
from ..stores import stuck as ops
from ..stores import traces

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["FLOW_STUCK", "SYSTEM_SOURCE", "FlowStuck", "announce_stuck"]

FLOW_STUCK = "interplay.flow.stuck"
"""The event type announcing a stuck flow (emitted in that flow)."""
SYSTEM_SOURCE = "interplay"
"""The ``source`` of messages the runtime itself emits."""
BATCH = 100
"""Stuck flows announced per transaction (a sweep takes as many batches as it needs)."""


class FlowStuck(BaseModel):
    """The payload of ``interplay.flow.stuck``.

    Attributes:
        flow_id: the stuck flow (the event is emitted in it).
        name: the declared flow's name.
        started: when the flow started (seconds since the epoch).
        deadline: when it should have ended at the latest (``started + within``).
        last_step: the type of the last message published in the flow: where it got to.
        pending: deliveries of the flow not yet handled when it was announced.
        detected: when the watch found it stuck.
    """

    flow_id: str
    name: str
    started: float
    deadline: float
    last_step: str | None = None
    pending: int = 0
    detected: float


async def announce_stuck(rt: Runtime) -> list[FlowStuck]:
    """Emit ``interplay.flow.stuck`` in every stuck flow not yet announced; returns those this process announced.

    The events are prepared outside the store transaction (observers may stamp trace
    headers on them), then each flow is marked and its event committed together, only
    if no other process marked it first.
    """
    announced: list[FlowStuck] = []
    while True:
        found, emitted = await _announce_batch(rt, rt.clock.now())
        announced += emitted
        if found < BATCH:
            return announced


async def _announce_batch(rt: Runtime, now: float) -> tuple[int, list[FlowStuck]]:
    """One batch: (how many overdue flows were found, those this call announced)."""
    overdue = await rt.store.read(lambda tx: traces.overdue_flows(tx, now, BATCH))
    if not overdue:
        return 0, []
    messages = []
    for flow in overdue:
        assert flow.deadline is not None  # overdue_flows selects flows with one
        payload = FlowStuck(
            flow_id=flow.flow_id, name=flow.name, started=flow.started, deadline=flow.deadline,
            last_step=flow.last_type, pending=flow.pending, detected=now,
        )
        msg = Message(type=FLOW_STUCK, payload=payload.model_dump(mode="json"), kind="event",
                      flow_id=flow.flow_id, source=SYSTEM_SOURCE)
        rt.instrumentation.published(msg)
        messages.append(msg)
    outgoing = rt.app.topology.outgoing
    emitted, relay = await rt.store.write(
        lambda tx: ops.announce_stuck(tx, now, messages, rt.delivery_mode, outgoing)
    )
    await rt.relay(relay)
    return len(overdue), [FlowStuck.model_validate(m.payload) for m in emitted]
