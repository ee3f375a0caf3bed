"""Talking to the test RabbitMQ directly, around interplay: its dead-letter queues."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from .servers import SERVERS

HOST, PORT = SERVERS["amqp"]
BROKER = f"amqp://guest:guest@{HOST}:{PORT}/"


async def take_all(queue_name: str) -> list[AbstractIncomingMessage]:
    """Take every message waiting in a queue (``:dlq``, ``:parked``)."""
    connection = await aio_pika.connect(BROKER)
    try:
        queue = await (await connection.channel()).get_queue(queue_name, ensure=False)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages
    finally:
        await connection.close()


async def dead_letter(exchange: str, body: bytes, headers: dict[str, Any], *, type: str | None = None) -> None:
    """Publish to ``<exchange>:dlx`` as RabbitMQ dead-letters (``x-death`` written by the test)."""
    await _publish(f"{exchange}:dlx", "", body, headers, type)


async def publish_raw(exchange: str, key: str, body: bytes, *, type: str | None = None,
                      headers: dict[str, Any] | None = None) -> None:
    """Publish to ``exchange`` as some other client might."""
    await _publish(exchange, key, body, headers or {}, type)


async def queued(queue_name: str) -> int:
    """How many messages wait in a queue (not counting those delivered and unacked)."""
    connection = await aio_pika.connect(BROKER)
    try:
        queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await connection.close()


async def park(queue_name: str, body: bytes, headers: dict[str, Any]) -> None:
    """Put a message straight into a queue (``:parked``), as an older interplay parked it."""
    await _publish("", queue_name, body, headers)


async def _publish(exchange: str, key: str, body: bytes, headers: dict[str, Any], type: str | None = None) -> None:
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if not exchange else await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, type=type)
        await target.publish(message, key)
    finally:
        await connection.close()
