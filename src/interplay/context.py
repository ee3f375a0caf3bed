"""The handler's Context: emit in the same flow, see the message, log with the flow id."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from .message import Message
from .payloads import to_json
from .service import check_name

__all__ = ["Context"]


class _FlowLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[flow {extra.get('flow_id')}] {msg}", kwargs


class Context:
    """What a handler can use besides its payload (declare a ``ctx: Context`` parameter).

    What the handler emits is not sent at once: it is committed together with the
    mark that the message was handled (the transactional outbox), so a crash never
    loses an emitted event nor sends it twice.

    Attributes:
        message: the message being handled.
        service: the name of the service handling it.
        attempt: which delivery of the message this is (1 = first).
    """

    def __init__(self, message: Message, service: str, attempt: int) -> None:
        self.message = message
        self.service = service
        self.attempt = attempt
        self.emitted: list[Message] = []
        self.transactions: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry ``flow_id``, ``message_id`` and ``service``."""
        if self._logger is None:  # made on first use: most handlers never log
            self._logger = _FlowLogger(
                logging.getLogger(f"interplay.service.{self.service}"),
                {"flow_id": self.message.flow_id, "message_id": self.message.id, "service": self.service},
            )
        return self._logger

    @property
    def flow_id(self) -> str:
        """The flow this message belongs to."""
        return self.message.flow_id

    @property
    def message_id(self) -> str:
        """The id of the message being handled: the idempotency key for outside effects."""
        return self.message.id

    async def emit(self, event: str, payload: Any = None, *, headers: dict[str, str] | None = None) -> str:
        """Emit ``event`` in this flow, caused by the current message.

        Returns:
            The new message's id.
        """
        check_name("event", event)
        msg = self.message.caused(event, to_json(payload), source=self.service, headers=headers)
        self.emitted.append(msg)
        return msg.id

    def transaction(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(tx, *args)`` in the store transaction that marks this message handled.

        ``tx`` is a :class:`~interplay.Transaction` on the store's database: rows your
        service keeps there change exactly once per message, whatever the redeliveries
        (the DBOS-transaction guarantee, for handlers). ``fn`` runs after the handler
        returns, when the handling commits; it must be synchronous and only touch the
        database. If it raises, the handling failed: nothing of it is kept, and the
        message is retried by the handler's policy.
        """
        self.transactions.append((fn, args))

    def __repr__(self) -> str:
        return f"Context(service={self.service!r}, message={self.message.type!r}, flow={self.flow_id!r})"
