"""Transports: the bus. :func:`open_transport` maps a URL scheme to a backend module.

Backends are imported only when used, so their drivers are optional extras:
``redis://`` needs ``interplay[redis]``, ``nats://`` ``interplay[nats]``,
``amqp://`` ``interplay[amqp]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .base import Delivery, Subscription, Transport, route_of

if TYPE_CHECKING:
    from ..stores.base import Store

__all__ = ["Delivery", "Subscription", "Transport", "open_transport", "route_of"]

# scheme -> (module, class, extra to install)
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("memory", "MemoryTransport", None),
    "redis": ("redis", "RedisTransport", "redis"),
    "rediss": ("redis", "RedisTransport", "redis"),
    "nats": ("nats", "NatsTransport", "nats"),
    "tls": ("nats", "NatsTransport", "nats"),
    "amqp": ("amqp", "AmqpTransport", "amqp"),
    "amqps": ("amqp", "AmqpTransport", "amqp"),
}


def open_transport(url: str | None, store: Store) -> Transport:
    """Make (not yet open) the transport for ``url``; None means the store's own queue."""
    if url is None or url in ("", "store", "store://"):
        from .store import StoreBus

        return StoreBus(store)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise ConfigurationError(
            f"unknown bus URL {url!r}: use memory://, redis://, nats://, amqp:// "
            "or no bus (the store's own queue)"
        )
    module_name, class_name, extra = backend
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        hint = f": pip install 'interplay[{extra}]'" if extra else ""
        raise ConfigurationError(f"the {scheme}:// transport is not available{hint} ({exc})") from None
    transport: Transport = getattr(module, class_name)(url)
    return transport
