"""Plain records passed between the runtime and a store (no behaviour, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..message import Message

__all__ = [
    "ClaimedRow",
    "DeadLetter",
    "DeadLetterRecord",
    "FlowRow",
    "FlowStart",
    "MessageRow",
    "OutboxRow",
    "Outgoing",
    "Settlement",
    "SpanRecord",
]


@dataclass(frozen=True, slots=True)
class FlowStart:
    """Opens a flow record when a message starts a new flow."""

    name: str
    kind: Literal["flow", "workflow"] = "flow"
    declared: bool = False
    deadline: float | None = None


@dataclass(slots=True)
class Outgoing:
    """A message about to be published, with what the store must know about it.

    Attributes:
        message: the envelope.
        route: the routing key (see :func:`interplay.transports.base.route_of`);
            empty for a record that only belongs in the trace (a workflow step).
        body: the encoded envelope.
        fanout: how many consumer groups the app declares for ``route`` (used to
            count a flow's pending deliveries when the bus is a broker).
        flow_start: set when this message opens a new flow.
        completes: names of declared flows that this message's type ends.
        fails: names of declared flows that this message's type fails.
    """

    message: Message
    route: str
    body: bytes
    fanout: int = 0
    flow_start: FlowStart | None = None
    completes: tuple[str, ...] = ()
    fails: tuple[str, ...] = ()
    visible_at: float | None = None


@dataclass(slots=True)
class SpanRecord:
    """One handling of one message by one service (an attempt)."""

    flow_id: str
    msg_id: str
    service: str
    handler: str | None
    type: str
    started: float
    ended: float
    outcome: str
    """``ok``, ``retry``, ``rejected``, ``dead``, ``invalid`` or ``duplicate``."""
    error: str | None
    attempt: int


@dataclass(slots=True)
class DeadLetter:
    """A message parked in the dead-letter queue, with why."""

    msg_id: str
    group: str
    route: str
    type: str
    flow_id: str | None
    body: bytes
    reason: str
    """``rejected``, ``retries_exhausted``, ``invalid_payload``, ``invalid_envelope``, ``no_handler``,
    ``too_many_deliveries``, ``emit_too_large``, ``abandoned`` (a broker gave up on it)."""
    error: str | None
    attempts: int
    counted: bool = True
    """Whether its flow counts it (pending, dead): not one a broker gave up on that no
    service of the app ever held."""


@dataclass(slots=True)
class DeadLetterRecord(DeadLetter):
    """A dead letter as stored, with its id and time."""

    id: int = 0
    time: float = 0.0


SettleOutcome = Literal["ok", "retry", "dead", "duplicate"]


@dataclass(slots=True)
class Settlement:
    """Everything that follows the handling of one delivery, committed as one unit.

    On the store bus this includes the ack (deleting the queue row, fenced by its
    lease); on a broker the ack follows the commit.
    """

    group: str
    msg_id: str
    flow_id: str | None
    outcome: SettleOutcome
    queue_id: int | None = None
    lease: str | None = None
    inbox: bool = False
    reply: bytes | None = None
    span: SpanRecord | None = None
    emits: list[Outgoing] = field(default_factory=list)
    dead: DeadLetter | None = None
    retry_at: float | None = None
    transactions: list[tuple[Any, tuple[Any, ...]]] = field(default_factory=list)
    """The handler's ``ctx.transaction`` functions, run after the inbox mark."""
    failure: str | None = None
    """Set when one of ``transactions`` raised (the settlement was undone)."""
    on_duplicate: Any = None
    """``on_duplicate(stored_reply, emitter)``: when the inbox shows another consumer won a
    race for this message, answer its caller with the reply stored by the winner."""
    extra: Any = None
    """``extra(emitter)`` runs inside the same transaction (e.g. a workflow journal
    write); the :class:`~interplay.stores.messaging.Emitter` gives it ``tx``."""


@dataclass(slots=True)
class ClaimedRow:
    """A queue row leased to a consumer."""

    queue_id: int
    lease: str
    body: bytes
    deliveries: int
    route: str | None = None
    duplicate: bool = False
    reply: bytes | None = None


@dataclass(slots=True)
class OutboxRow:
    """An outbox row a relay loop took (for ``outbox_grace`` seconds) to publish.

    ``attempts`` counts the claims of the row, this one included; it is also the
    token that fences the claim (a later claim bumps it).
    """

    id: int
    route: str
    msg_id: str
    body: bytes
    attempts: int


@dataclass(slots=True)
class MessageRow:
    """A published message as the trace log keeps it."""

    id: str
    flow_id: str
    causation_id: str | None
    kind: str
    type: str
    source: str | None
    time: float
    payload: Any


@dataclass(slots=True)
class FlowRow:
    """A flow's summary record."""

    flow_id: str
    name: str
    kind: str
    declared: bool
    started: float
    deadline: float | None
    status: str
    ended: float | None
    pending: int
    dead: int
    last_type: str | None
    updated: float


@dataclass(slots=True)
class RunRow:
    """A workflow run as stored."""

    run_id: str
    workflow: str
    flow_id: str
    parent_run: str | None
    parent_seq: int | None
    status: str
    """``pending``, ``running``, ``completed``, ``failed``, ``compensated``, ``cancelled``, ``parked``."""
    input: Any
    result: Any
    error_type: str | None
    error: str | None
    owner: str | None
    lease_until: float | None
    cancel_requested: bool
    created: float
    updated: float
    epoch: int = 0
    """Bumped by every claim: the fencing token of the current owner's lease."""

    @property
    def holder(self) -> tuple[str, int]:
        """(owner, epoch): what every write in the run's name is fenced by."""
        return (self.owner or "", self.epoch)


@dataclass(slots=True)
class JournalEntry:
    """One step of a run's journal.

    Attributes:
        seq: the step's position in the workflow's execution (0, 1, ...).
        kind: ``call``, ``step``, ``emit``, ``wait``, ``sleep``, ``child``, ``child_result``, ``now``.
        name: what it did (command, function, event, child workflow...).
        status: ``scheduled`` (in flight), ``completed`` or ``failed``.
        msg_id: the message it sent (a command, an event), re-sent with the same id.
        data: the result (JSON), or for a scheduled step what replay needs.
        deadline: when a timer fires or a call/wait times out.
    """

    run_id: str
    seq: int
    kind: str
    name: str
    status: str
    msg_id: str | None = None
    data: Any = None
    error_type: str | None = None
    error: str | None = None
    started: float = 0.0
    ended: float | None = None
    deadline: float | None = None
