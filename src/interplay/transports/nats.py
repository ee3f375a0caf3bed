"""``nats://`` - NATS JetStream: one stream, durable pull consumers, publish acks.

The layout on the server (names come from the URL, see :class:`NatsOptions`):

* **One stream** captures ``<prefix>.>`` (route ``event.order.created`` -> subject
  ``ip.event.order.created``). *Limits* retention by default: a message stays for
  ``max_age`` (7 days) however many groups acked it, so a group that declared a route
  but runs no consumer finds its copies when it comes back. ``retention=interest``
  (gone once every matching consumer acked it) is opt-in: on nats-server 2.9.10 a
  restart can delete messages one group has not consumed yet when another group acked
  past them - the broker-outage test lost orders that way.
* **Durable pull consumers per group**, one per declared route (filter = its subject)
  plus one on ``<prefix>._group.<group>`` for :meth:`NatsTransport.publish_to_group`.
  Not one consumer with ``filter_subjects``: that needs nats-server 2.10, and 2.9
  silently ignores the field (the consumer would get *every* subject). Consumers
  deliver what is published after their creation (``deliver_policy: new``).
* **Acks** are explicit, AckWait = the subscription's lease, ``nack(delay)`` is a
  delayed ``-NAK``, ``extend`` is ``+WPI`` (restarts AckWait). ``max_deliver`` is
  unlimited: the runtime dead-letters by delivery count into its store, while a broker
  limit would silently stop delivering - a lost message.
* **Publishing** waits for every publish ack (pipelined), with ``Nats-Msg-Id`` = the
  envelope id: a retry within ``dedup_window`` (2 minutes) is stored once. A full
  stream (``max_bytes``) refuses new messages - the publish fails and stays in the
  outbox - rather than evicting ones a group has not consumed.

Durability: ``storage=file`` survives a server restart; against power loss run
``sync_interval: always`` (nats-server 2.10+) and R3 streams. nats-py reconnects by
itself, forever; meanwhile pulls and publishes fail with ``TransportError`` and the
runtime retries them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from ..errors import ConfigurationError, TransportError
from .base import Delivery, Subscription, Transport

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription as NatsSubscription

    from ..clock import Clock
    from ..stores.records import Outgoing

__all__ = ["NatsOptions", "NatsTransport"]

log = logging.getLogger("interplay.transports.nats")

_NS = 1_000_000_000
_HEADER_ROOM = 1024  # bytes of max_payload kept for headers: the server limits both together
_PUBLISH_WINDOW = 256  # publishes whose acks are awaited together
_GRACE = 1.0  # seconds after a pull's expiry by which the server must have answered it
# Long polls stay open across receive calls. Long, because nats-server 2.9 can swallow a
# redelivery that coincides with a pull's expiry (the delivery count goes up, the
# message comes one AckWait later): the rarer expiries are, the rarer that is.
_LONG_POLL = 30.0
_ROUTE_HEADER = "Interplay-Route"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_MEMBER = re.compile(r"^(?:[0-9a-f]{12}|direct)$")
_STREAM_NOT_FOUND, _CONSUMER_NOT_FOUND = 10059, 10014  # JetStream API error codes
_NATS_ERRORS = (nats.errors.Error, OSError)


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """Settings of a ``nats://`` bus, from the URL's query string.

    ``nats://user:pass@host1:4222,host2:4222?stream=SHOP&replicas=3`` - several
    servers are comma-separated; ``tls://`` connects with TLS.
    """

    stream: str = "INTERPLAY"
    """The JetStream stream holding every message of this bus (created if missing)."""
    prefix: str = ""
    """Subject prefix; default ``ip`` for the default stream, else the stream's name
    (two streams may not capture the same subjects)."""
    storage: str = "file"
    """``file`` (survives a server restart) or ``memory`` (does not: not durable)."""
    retention: str = "limits"
    """``limits``: keep messages for ``max_age``; ``interest``: drop a message once every
    group acked it (unsafe on nats-server 2.9, see the module docs)."""
    max_age: float = 7 * 24 * 3600.0
    """Seconds a message is kept: longer than any group may be away (and than the
    runtime's inbox retention, so a redelivery is always recognised)."""
    max_bytes: int = -1
    """Size limit of the stream (-1: none); when full, publishing fails (no eviction)."""
    replicas: int = 1
    """Stream replicas in a cluster (3 in production)."""
    dedup_window: float = 120.0
    """Seconds JetStream remembers message ids to drop a re-published duplicate."""
    ack_wait: float = 30.0
    """AckWait of a group declared before any consumer subscribed (subscribing sets
    it to the subscription's lease; all consumers of a group should use one lease)."""
    max_ack_pending: int = 10_000
    """Unacked messages a group may have out, including nacked ones waiting out their
    delay; beyond it delivery pauses (nothing is dropped)."""
    ephemeral_ttl: float = 600.0
    """Seconds an ephemeral group (a runtime's replies) outlives its last pull."""
    timeout: float = 5.0
    """Seconds to wait for a publish ack or a JetStream API answer."""
    connect_timeout: float = 5.0
    """Seconds ``open`` keeps trying to reach a server."""
    reconnect_wait: float = 0.5
    """Seconds between reconnection attempts once connected (it retries forever)."""

    @classmethod
    def from_url(cls, url: str) -> tuple[list[str], NatsOptions]:
        """The server URLs and the options in ``url``.

        Raises:
            ConfigurationError: an unknown option or a bad value.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls"):
            raise ConfigurationError(f"not a NATS URL (nats:// or tls://): scheme {parts.scheme!r}")
        defaults, known, values = cls(), [f.name for f in fields(cls)], {}
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known:
                raise ConfigurationError(f"unknown nats:// option {key!r}; known: {', '.join(known)}")
            kind = type(getattr(defaults, key))
            try:
                values[key] = kind(raw)
            except ValueError:
                raise ConfigurationError(f"nats:// option {key}={raw!r} is not a {kind.__name__}") from None
        opts = cls(**values)
        if not opts.prefix:
            opts = replace(opts, prefix="ip" if opts.stream == defaults.stream else opts.stream)
        checks = {
            "stream": _NAME.match(opts.stream), "prefix": _SUBJECT.match(opts.prefix),
            "storage": opts.storage in ("file", "memory"), "retention": opts.retention in ("limits", "interest"),
            "max_bytes": opts.max_bytes == -1 or opts.max_bytes > 0,
        }
        checks.update((name, getattr(opts, name) > 0) for name in known if name not in checks
                      and isinstance(getattr(opts, name), int | float))
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigurationError(f"bad nats:// option(s) {', '.join(bad)}: see NatsOptions")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        auth = userinfo + "@" if userinfo else ""
        servers = [f"{parts.scheme}://{auth}{host}" for host in hosts.split(",") if host]
        return servers or [f"{parts.scheme}://127.0.0.1:4222"], opts


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


class _ApiError(TransportError):
    """JetStream answered an API request with an error."""

    def __init__(self, what: str, error: dict[str, Any]) -> None:
        self.err_code = int(error.get("err_code") or 0)
        super().__init__(f"JetStream {what}: {error.get('description', 'error')} (code {self.err_code})")


class NatsTransport(Transport):
    """A bus on NATS JetStream (``nats://host:4222?stream=NAME``).

    Attributes:
        servers: the server URLs to connect to.
        options: the settings parsed from the URL.
        reconnects: how many times the connection was re-established.
    """

    scheme = "nats"

    def __init__(self, url: str = "nats://127.0.0.1:4222") -> None:
        self.servers, self.options = NatsOptions.from_url(url)
        self.durable = self.options.storage == "file"
        self.reconnects = 0
        self._nc: Client | None = None
        self._subs: list[_NatsSubscription] = []
        self._ephemeral: set[str] = set()
        self._epoch = 0  # bumped on every disconnect and reconnect: pulls sent before are void

    # ------------------------------------------------------------------ connection
    async def open(self, clock: Clock) -> None:
        """Connect and make sure the stream exists (JetStream timers run on real time)."""
        if self._nc is not None:
            return
        nc = Client()
        settings: dict[str, Any] = {
            "servers": self.servers, "name": "interplay", "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # a broker outage must never end the process's bus
            "ping_interval": 10,  # long polls stay open: notice a dead TCP connection soon
            "reconnect_time_wait": self.options.reconnect_wait, "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect, "reconnected_cb": self._on_reconnect,
        }
        try:
            # With unlimited attempts nats-py would retry the first connection forever too.
            await asyncio.wait_for(nc.connect(**settings), self.options.connect_timeout)
        except (TimeoutError, *_NATS_ERRORS) as exc:
            await _close_quietly(nc)
            where = ", ".join(s.rpartition("@")[2] for s in self.servers)
            raise TransportError(f"cannot connect to NATS at {where}: {type(exc).__name__} {exc}") from exc
        self._nc = nc
        version = nc.connected_server_version
        if self.options.retention == "interest" and (version.major, version.minor) < (2, 10):
            log.warning("retention=interest on nats-server %s can lose unconsumed messages in a restart", version)
        try:
            await self._ensure_stream()
        except BaseException:
            self._nc = None
            await _close_quietly(nc)
            raise

    async def close(self) -> None:
        """Stop every subscription (their unhandled messages go back) and disconnect."""
        nc = self._nc
        if nc is None:
            return
        for sub in list(self._subs):
            await sub.close()
        self._nc = None
        if nc.is_connected:
            try:  # let acks and naks reach the server before the socket closes
                await nc.flush(timeout=max(1, int(self.options.timeout)))
            except _NATS_ERRORS as exc:
                log.debug("flush before close failed: %s", exc)
        await _close_quietly(nc)

    @property
    def connected(self) -> bool:
        """Whether the connection to a server is up right now."""
        return self._nc is not None and self._nc.is_connected

    @property
    def max_body(self) -> int:
        """The largest message body the server accepts (its max_payload, less headers)."""
        return self._connection().max_payload - _HEADER_ROOM

    def body_limit(self) -> int | None:
        """:attr:`max_body` while connected (None when not: the publish itself checks then)."""
        try:
            return self.max_body
        except TransportError:
            return None

    def _connection(self) -> Client:
        if self._nc is None or self._nc.is_closed:
            raise TransportError("the nats:// transport is not open")
        return self._nc

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS connection: %s %s", type(exc).__name__, exc)

    async def _on_disconnect(self) -> None:
        self._epoch += 1
        if self._nc is not None:  # not our own close
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnect(self) -> None:
        self._epoch += 1
        self.reconnects += 1
        log.warning("reconnected to NATS")
        for sub in self._subs:
            sub.connection_reset()

    async def _api(self, what: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request; driver errors and API errors become TransportError."""
        nc = self._connection()
        try:
            reply = await nc.request(f"$JS.API.{what}", orjson.dumps(body) if body else b"",
                                     timeout=self.options.timeout)
            resp: dict[str, Any] = orjson.loads(reply.data)
        except nats.errors.NoRespondersError as exc:
            raise TransportError(f"JetStream {what}: no responders (is JetStream enabled and ready?)") from exc
        except (*_NATS_ERRORS, orjson.JSONDecodeError) as exc:
            raise TransportError(f"JetStream {what} failed: {type(exc).__name__} {exc}") from exc
        if resp.get("error"):
            raise _ApiError(what, resp["error"])
        return resp

    # ------------------------------------------------------------------ stream and consumers
    def _subject(self, route: str) -> str:
        return f"{self.options.prefix}.{route}"

    def _direct_subject(self, group: str) -> str:
        return f"{self.options.prefix}._group.{group}"

    @staticmethod
    def _group_key(group: str) -> str:
        # Consumer names may not contain dots; the digest keeps sanitized names apart.
        return f"{re.sub(r'[^A-Za-z0-9_-]', '_', group)[:40]}-{_digest(group, 8)}"

    def _consumers_wanted(self, group: str, routes: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Consumer name -> (filter subject, what it carries) for a group's routes."""
        key = self._group_key(group)
        wanted = {f"{key}-{_digest(r, 12)}": (self._subject(r), r) for r in dict.fromkeys(routes)}
        wanted[f"{key}-direct"] = (self._direct_subject(group), "messages for this group only")
        return wanted

    def _route_of(self, msg: Msg) -> str | None:
        prefix = self.options.prefix + "."
        if msg.subject.startswith(prefix + "_group."):
            return (msg.headers or {}).get(_ROUTE_HEADER)
        return msg.subject[len(prefix):] if msg.subject.startswith(prefix) else None

    async def _ensure_stream(self) -> None:
        opts = self.options
        try:
            info = await self._api(f"STREAM.INFO.{opts.stream}")
        except _ApiError as exc:
            if exc.err_code != _STREAM_NOT_FOUND:
                raise
            config = {
                "name": opts.stream, "subjects": [f"{opts.prefix}.>"], "retention": opts.retention,
                "storage": opts.storage, "num_replicas": opts.replicas, "discard": "new",
                "duplicate_window": int(opts.dedup_window * _NS), "max_age": int(opts.max_age * _NS),
                "max_bytes": opts.max_bytes, "max_msgs": -1, "max_msg_size": -1, "max_consumers": -1,
            }
            try:
                await self._api(f"STREAM.CREATE.{opts.stream}", config)
                return
            except _ApiError:  # created meanwhile by another process? check what is there
                info = await self._api(f"STREAM.INFO.{opts.stream}")
        config = info.get("config", {})
        if config.get("retention") != opts.retention or f"{opts.prefix}.>" not in config.get("subjects", []):
            raise ConfigurationError(
                f"stream {opts.stream} exists with {config.get('retention')} retention on subjects "
                f"{config.get('subjects')}, not {opts.retention} on {opts.prefix}.> "
                "(set retention= to match, or choose another stream= name)"
            )

    async def _group_consumers(self, group: str) -> dict[str, dict[str, Any]]:
        """The group's existing consumers: name -> config."""
        key, found, offset = self._group_key(group) + "-", {}, 0
        while True:
            page = await self._api(f"CONSUMER.LIST.{self.options.stream}", {"offset": offset})
            items = page.get("consumers") or []
            for info in items:
                name = str(info.get("name", ""))
                if name.startswith(key) and _MEMBER.match(name[len(key):]):
                    found[name] = info.get("config", {})
            offset += len(items)
            if not items or offset >= int(page.get("total", 0)):
                return found

    async def _ensure_group(
        self, group: str, routes: Sequence[str], *, ephemeral: bool, ack_wait: float | None
    ) -> list[str]:
        """Give the group a consumer for each of ``routes``; with ``ack_wait``, set their AckWait.

        Declaring only adds (as on every transport): a consumer the group has for a route
        it no longer declares is kept and still pulled, so what queued there is handled
        (dead-lettered as ``no_handler`` when its handler is gone) instead of lost.
        Returns every consumer of the group.
        """
        wanted = self._consumers_wanted(group, routes)
        existing = await self._group_consumers(group)
        stream = self.options.stream
        for name, (subject, carries) in wanted.items():
            current = existing.get(name)
            wait = int((ack_wait if ack_wait is not None else self.options.ack_wait) * _NS)
            inactive = int(self.options.ephemeral_ttl * _NS) if ephemeral else None
            if current is not None:
                if ack_wait is None:  # a bare declare never undoes a subscriber's lease
                    wait = int(current.get("ack_wait") or wait)
                if current.get("filter_subject") == subject and current.get("ack_wait") == wait:
                    continue  # as wanted: declaring again changes nothing
                inactive = current.get("inactive_threshold") or None  # an update keeps what it was
            config: dict[str, Any] = {
                "durable_name": name, "description": f"interplay group {group}: {carries}",
                "deliver_policy": "new", "ack_policy": "explicit", "ack_wait": wait, "max_deliver": -1,
                "filter_subject": subject, "replay_policy": "instant",
                "max_ack_pending": self.options.max_ack_pending,
            }
            if inactive:
                config["inactive_threshold"] = inactive
            await self._api(f"CONSUMER.DURABLE.CREATE.{stream}.{name}", {"stream_name": stream, "config": config})
        return sorted(wanted.keys() | existing.keys())

    async def _delete_consumer(self, name: str) -> None:
        try:
            await self._api(f"CONSUMER.DELETE.{self.options.stream}.{name}")
        except _ApiError as exc:
            if exc.err_code != _CONSUMER_NOT_FOUND:
                raise

    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Make ``group`` receive ``routes`` (idempotent; only ever adds).

        Messages published to a route queue for the group from now on, whether or not
        a consumer runs. An ephemeral group's consumers vanish ``ephemeral_ttl``
        seconds after its last pull.
        """
        if ephemeral:
            self._ephemeral.add(group)
        await self._ensure_group(group, routes, ephemeral=ephemeral, ack_wait=None)

    async def drop_group(self, group: str) -> None:
        """Delete the group's consumers (it receives nothing more)."""
        self._ephemeral.discard(group)
        for name in await self._group_consumers(group):
            await self._delete_consumer(name)

    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Consume ``group``: declare it for ``routes`` with AckWait = ``lease``."""
        names = await self._ensure_group(group, routes, ephemeral=group in self._ephemeral, ack_wait=lease)
        sub = _NatsSubscription(self, group, list(routes), names, lease)
        await sub.start()
        self._subs.append(sub)
        return sub

    # ------------------------------------------------------------------ publishing
    def _check_size(self, body: bytes, subject: str) -> None:
        if len(body) > (limit := self.max_body):
            raise TransportError(
                f"message for {subject} too large: {len(body)} bytes, the NATS server takes {limit} "
                "(raise max_payload in its config, or publish a reference to the data)"
            )

    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """Publish with ``Nats-Msg-Id`` = message id and wait for every publish ack.

        Raises:
            TransportError: a message is too large, or some publish was not confirmed
                (it may still have been stored: retry with the same message ids).
        """
        nc = self._connection()
        for out in batch:
            self._check_size(out.body, self._subject(out.route))
        for start in range(0, len(batch), _PUBLISH_WINDOW):
            chunk = batch[start:start + _PUBLISH_WINDOW]
            results = await asyncio.gather(
                *(self._publish_one(nc, self._subject(o.route), o.body, {"Nats-Msg-Id": o.message.id})
                  for o in chunk),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed and not isinstance(failed[0], TransportError):
                raise failed[0]
            if failed:
                raise TransportError(f"{len(failed)} of {len(chunk)} publishes unconfirmed: {failed[0]}")

    async def _publish_one(self, nc: Client, subject: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            reply = await nc.request(subject, body, timeout=self.options.timeout, headers=headers)
            ack = orjson.loads(reply.data)
        except nats.errors.NoRespondersError as exc:
            raise TransportError(f"no JetStream stream stores {subject} (stream deleted?)") from exc
        except (*_NATS_ERRORS, orjson.JSONDecodeError) as exc:
            raise TransportError(f"publish to {subject} unconfirmed ({type(exc).__name__} {exc})") from exc
        if "error" in ack:
            raise TransportError(f"JetStream refused a message for {subject}: {ack['error'].get('description')}")

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """Deliver raw bytes to one group only, through its direct consumer.

        No ``Nats-Msg-Id``: a replayed dead letter keeps its envelope id, and the
        broker must not drop it as a duplicate of the original publish.
        """
        subject = self._direct_subject(group)
        self._check_size(body, subject)
        await self._publish_one(self._connection(), subject, body, {_ROUTE_HEADER: route})


class _Pull:
    """A pull request open on one consumer."""

    __slots__ = ("batch", "done", "epoch", "expires_at", "received", "request_id")

    def __init__(self, request_id: str, batch: int, expires_at: float, epoch: int) -> None:
        self.request_id, self.batch, self.expires_at, self.epoch = request_id, batch, expires_at, epoch
        self.received = 0
        self.done = asyncio.Event()


class _NatsSubscription(Subscription):
    """Pulls from a group's consumers, at most one request open on each at a time.

    Messages and pull statuses arrive on one inbox; messages wait in ``_buffer`` until
    ``receive`` hands them out. ``receive`` first takes what is ready (no-wait pulls,
    one consumer after the other, each for the room left), so it never asks for more
    than the caller wants while competing consumers could take the rest. Only when
    nothing is ready does it long-poll every consumer at once, sharing the room out;
    those polls stay open after it returns and are served to the next call.
    """

    def __init__(self, transport: NatsTransport, group: str, routes: list[str], names: list[str],
                 lease: float) -> None:
        self.transport, self.group, self.routes, self.lease = transport, group, routes, lease
        self._sources: dict[str, _Pull | None] = dict.fromkeys(names)
        self._order = list(names)  # rotated on every sweep, so one busy route starves none
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._inbox = ""
        self._sub: NatsSubscription | None = None
        self._ids = itertools.count(1)
        self._redeclare = False
        self._closed = False

    async def start(self) -> None:
        nc = self.transport._connection()
        self._inbox = nc.new_inbox()
        try:
            self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        except _NATS_ERRORS as exc:
            raise TransportError(f"cannot subscribe for group {self.group}: {exc}") from exc

    def connection_reset(self) -> None:
        """The server may have forgotten our pull requests: issue new ones."""
        for name in self._sources:
            self._finish(name)
        self._arrived.set()

    def _finish(self, name: str) -> None:
        pull = self._sources.get(name)
        if pull is not None:
            self._sources[name] = None
            pull.done.set()

    async def _on_message(self, msg: Msg) -> None:
        if msg.reply.startswith("$JS.ACK."):
            if self._closed:  # arrived after close: hand it straight back
                await self._frame(msg, b"-NAK", quiet=True)
                return
            consumer = msg.metadata.consumer or ""
            pull = self._sources.get(consumer)
            if pull is not None:
                pull.received += 1
                if pull.received >= pull.batch:
                    self._finish(consumer)
            self._buffer.append(msg)
            self._arrived.set()
            return
        # A status about one of our pulls; its request id is the last subject token.
        headers = msg.headers or {}
        status, why = headers.get("Status", ""), headers.get("Description", "")
        if status == "100":
            return
        request_id = msg.subject.rpartition(".")[2]
        for name, pull in self._sources.items():
            if pull is not None and pull.request_id == request_id:
                self._finish(name)
                break
        if status == "409" and "deleted" in why.lower():
            log.warning("%s: consumer deleted on the server; declaring the group again", self.group)
            self._redeclare = True
        elif status not in ("404", "408", "409", ""):
            log.info("%s: pull answered %s %s", self.group, status, why)
        self._arrived.set()

    async def _send_pull(self, name: str, batch: int, expires: float | None) -> _Pull:
        transport = self.transport
        nc = transport._connection()
        # The server answers a pull at its expiry (a no-wait pull at once); silence past
        # that means it has no such consumer (see _expire).
        expires_at = asyncio.get_running_loop().time() + (expires or 0.0) + _GRACE
        pull = self._sources[name] = _Pull(str(next(self._ids)), batch, expires_at, transport._epoch)
        # max_bytes bounds what a batch of big messages puts in the inbox, leaving room
        # for the largest single message.
        request: dict[str, Any] = {"batch": batch, "max_bytes": max(16 << 20, 2 * nc.max_payload)}
        request.update({"no_wait": True} if expires is None else {"expires": int(expires * _NS)})
        try:
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{transport.options.stream}.{name}",
                             orjson.dumps(request), reply=f"{self._inbox}.{pull.request_id}")
        except _NATS_ERRORS as exc:
            self._finish(name)
            raise TransportError(f"{self.group}: pull request failed: {type(exc).__name__} {exc}") from exc
        return pull

    def _expire(self, now: float) -> None:
        for name, pull in list(self._sources.items()):
            if pull is not None and pull.expires_at <= now:
                self._finish(name)
                if pull.epoch == self.transport._epoch and self.transport.connected:
                    # Connected all along and no answer: the server has no such consumer
                    # (an ephemeral group timed out, someone deleted it): declare again.
                    self._redeclare = True

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError(f"subscription of group {self.group} is closed")
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._expire(loop.time())
        if self._redeclare:
            await self._declare_again()
        if not self._buffer and self.transport.connected:
            await self._sweep(max_messages, deadline)
        while not self._buffer:
            now = loop.time()
            if now >= deadline:
                return []
            self._arrived.clear()
            self._expire(now)
            if self.transport.connected:
                idle = [name for name, pull in self._sources.items() if pull is None]
                for name in idle:  # long-poll every idle consumer at once, sharing the room
                    await self._send_pull(name, max(1, max_messages // len(idle)), _LONG_POLL)
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - now)
            except TimeoutError:
                pass
            if self._redeclare and not self._buffer:
                await self._declare_again()
        return self._take(max_messages)

    async def _sweep(self, max_messages: int, deadline: float) -> None:
        """Take what is ready now from each consumer, one at a time (no over-asking)."""
        loop = asyncio.get_running_loop()
        self._order.append(self._order.pop(0))
        for name in self._order:
            room, left = max_messages - len(self._buffer), deadline - loop.time()
            if room <= 0 or left <= 0:
                return
            if self._sources.get(name) is not None:
                continue  # a long poll is open there; whatever is ready went to it
            pull = await self._send_pull(name, room, None)
            try:
                await asyncio.wait_for(pull.done.wait(), min(left, self.transport.options.timeout))
            except TimeoutError:
                return  # no answer yet; it lands in the buffer when it comes

    async def _declare_again(self) -> None:
        self._redeclare = False
        transport = self.transport
        names = await transport._ensure_group(
            self.group, self.routes, ephemeral=self.group in transport._ephemeral, ack_wait=self.lease
        )
        for name in names:
            self._sources.setdefault(name, None)

    def _take(self, max_messages: int) -> list[Delivery]:
        out: list[Delivery] = []
        while self._buffer and len(out) < max_messages:
            msg = self._buffer.popleft()
            route = self.transport._route_of(msg)
            out.append(Delivery.from_bytes(msg.data, msg.metadata.num_delivered, route=route, handle=msg))
        return out

    async def _frame(self, msg: Msg, frame: bytes, *, quiet: bool = False) -> None:
        """Send an ack frame (+ACK, -NAK, +WPI) for a delivered message."""
        try:
            await self.transport._connection().publish(msg.reply, frame)
        except (TransportError, *_NATS_ERRORS) as exc:
            if quiet:  # the message comes back after its AckWait anyway
                log.debug("%s: %r for a message not sent: %s", self.group, frame, exc)
            elif isinstance(exc, TransportError):
                raise
            else:
                raise TransportError(f"{self.group}: cannot send {frame!r}: {type(exc).__name__} {exc}") from exc

    async def _frames(self, deliveries: Sequence[Delivery], frame: bytes) -> None:
        for d in deliveries:
            if not isinstance(d.handle, Msg):
                raise TransportError("not a delivery of the nats:// transport")
            await self._frame(d.handle, frame)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._frames(deliveries, b"+ACK")

    async def nack(self, delivery: Delivery, delay: float) -> None:
        frame = b"-NAK " + orjson.dumps({"delay": int(delay * _NS)}) if delay > 0 else b"-NAK"
        await self._frames([delivery], frame)

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        # +WPI restarts the consumer's AckWait, which is this subscription's lease.
        await self._frames(deliveries, b"+WPI")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self in self.transport._subs:
            self.transport._subs.remove(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except _NATS_ERRORS as exc:
                log.debug("%s: unsubscribe failed: %s", self.group, exc)
        # Delivered to us but never handed out: give them back now, not after AckWait.
        while self._buffer:
            await self._frame(self._buffer.popleft(), b"-NAK", quiet=True)


async def _close_quietly(nc: Client) -> None:
    try:
        await nc.close()
    except _NATS_ERRORS as exc:  # closing a dead connection: nothing left to save
        log.debug("closing the NATS connection: %s", exc)
