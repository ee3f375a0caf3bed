"""``redis://`` - a bus on Redis Streams with consumer groups (needs ``interplay[redis]``).

Keys (``prefix`` defaults to ``ip:``):

* ``<prefix><route>`` - a stream per route, e.g. ``ip:event.order.created``; each entry's
  ``body`` field holds the exact envelope bytes. Each interplay group (service) is a
  consumer group on every stream it declares, created with ``MKSTREAM`` at ``$``: it
  gets everything published after its declaration, queued while no consumer runs.
* ``<prefix>@group:<g>`` - the group's direct stream: ``publish_to_group`` (DLQ replay,
  tools) and nacked messages coming back. Entries also carry ``route`` and, when
  nacked, ``deliveries`` (the count so far).
* ``<prefix>@delayed:<g>`` - nacked messages, scored by when they are due.
* ``<prefix>@routes:<g>`` - the routes the group declared (for ``drop_group``).

Receiving is one atomic Lua script per poll: move due nacked messages to the direct
stream; every ``lease / 4`` (at most 5 s) ``XAUTOCLAIM`` entries idle for a whole lease
(their consumer died or stopped heartbeating); then ``XREADGROUP >`` stream by stream,
in turns, up to ``max_messages`` (a multi-stream ``XREADGROUP`` applies ``COUNT`` per
stream and would hand out more than asked). With nothing to read, the consumer blocks
in ``XREAD`` after the group's last-delivered ids - woken by new entries without taking
any - for at most a second. Concurrent callers share round trips: acks (``XACK``)
one pipeline, publishes (``XADD NOMKSTREAM``) one script call.

Delivery count: the pending-entries list (PEL) counts deliveries and ``XAUTOCLAIM``
raises it, so a claimed entry reports its PEL count (``XPENDING``, in the same script);
a nacked message is re-added carrying its count and reports that plus its PEL count.

``nack(delay)``: Redis has no delayed redelivery. A script checks this consumer still
owns the entry, adds it to the delayed set due at server time + ``delay`` and acks the
original, atomically. A timer in the nacking process moves it back when due; every
poll of the group's consumers moves due entries too, so a crash loses nothing.
``extend`` resets the idle time of entries this consumer owns (``XCLAIM ... JUSTID``).
Delays and idle times are Redis server time, shared by all processes (a test's virtual
clock does not move them).

Trimming: every ``trim_interval`` seconds each stream declared here is cut to its
*consumption floor* - the oldest id pending in any group, else the oldest
last-delivered id - with ``XTRIM MINID``. A stream's length is thus capped by what
some group has not acknowledged yet and never below it: an unread or unacknowledged
message is never trimmed, a backlog grows instead (watch ``XLEN``). ``MAXLEN`` capping
is deliberately not used: it drops unread messages. The same pass removes consumers
idle for an hour that hold nothing.

Ephemeral groups are deleted by ``drop_group`` or when the transport closes, with any
stream no other group reads; a crashed process leaves its (small) reply stream behind.

URL: ``redis://[user:password@]host:port/db?prefix=ip:&trim_interval=30``, plus
redis-py's own options (``socket_timeout``, ``health_check_interval``, ...).
``socket_timeout`` and ``socket_connect_timeout`` default to 5 seconds, so no command
waits forever on a connection that went quiet; blocking reads stay below the first.

Durability depends on the server: run it with ``appendonly yes`` and ``appendfsync
always`` (a warning is logged otherwise). Commands are retried a few times over a
dropped connection; then :class:`~interplay.errors.TransportError` is raised and the
runtime retries (unpublished messages stay in the outbox; unacked ones come back
after their lease). Redis Cluster is not supported: scripts span hash slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import ConfigurationError, TransportError
from .base import Delivery, Subscription, Transport
from .coalesce import Coalescer, Refused

if TYPE_CHECKING:
    from ..clock import Clock
    from ..stores.records import Outgoing

__all__ = ["RedisTransport"]

log = logging.getLogger("interplay.transports.redis")

_NOW_MS = "local t = redis.call('TIME')\nlocal now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# Moves due nacked messages (member: token \n deliveries \n route \n body) to the direct
# stream; returns ms until the next one is due, or -1.
_MOVE_DUE = """
local function move_due(delayed, direct, now_ms)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now_ms, 'LIMIT', 0, 256)) do
    local a = string.find(m, '\\n', 1, true)
    local b = string.find(m, '\\n', a + 1, true)
    local c = string.find(m, '\\n', b + 1, true)
    redis.call('XADD', direct, '*', 'body', string.sub(m, c + 1), 'route', string.sub(m, b + 1, c - 1),
               'deliveries', string.sub(m, a + 1, b - 1))
    redis.call('ZREM', delayed, m)
  end
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(0, tonumber(first[2]) - now_ms) end
  return -1
end
"""

_MOVE = _MOVE_DUE + _NOW_MS + "return move_due(KEYS[1], KEYS[2], now_ms)"

# KEYS: delayed set, then the streams (the direct one first). ARGV: group, consumer,
# want, claim?, min idle ms, first stream to read, one XAUTOCLAIM cursor per stream.
# Returns {{stream index, id, fields, PEL count}...}, cursors, wait ids, next due.
_POLL = _MOVE_DUE + _NOW_MS + """
local group, consumer = ARGV[1], ARGV[2]
local left = tonumber(ARGV[3])
local n = #KEYS - 1
local next_due = move_due(KEYS[1], KEYS[2], now_ms)
local out, cursors, waits = {}, {}, {}
for i = 1, n do cursors[i] = ARGV[6 + i] end
if ARGV[4] == '1' then
  for i = 1, n do
    if left <= 0 then break end
    local r = redis.call('XAUTOCLAIM', KEYS[i + 1], group, consumer, ARGV[5], cursors[i], 'COUNT', left)
    cursors[i] = r[1]
    for _, e in ipairs(r[2]) do
      if e[2] then
        local p = redis.call('XPENDING', KEYS[i + 1], group, e[1], e[1], 1)
        out[#out + 1] = {i, e[1], e[2], p[1] and p[1][4] or 1}
        left = left - 1
      end
    end
  end
end
for j = 0, n - 1 do
  if left <= 0 then break end
  local i = (tonumber(ARGV[6]) + j) % n + 1
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', KEYS[i + 1], '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      out[#out + 1] = {i, e[1], e[2], 1}
      left = left - 1
    end
  end
end
if #out == 0 then
  for i = 1, n do
    waits[i] = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i + 1])) do
      local f = {}
      for k = 1, #g, 2 do f[g[k]] = g[k + 1] end
      if f['name'] == group then waits[i] = f['last-delivered-id'] end
    end
  end
end
return {out, cursors, waits, next_due}
"""

# KEYS: stream, delayed set. ARGV: group, consumer, id, delay ms, token, deliveries, route, body.
_NACK = _NOW_MS + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[4]),
           ARGV[5] .. '\\n' .. ARGV[6] .. '\\n' .. ARGV[7] .. '\\n' .. ARGV[8])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: stream. ARGV: group, consumer, idle ms, ids. Only entries this consumer still owns.
_EXTEND = """
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# KEYS: streams. ARGV: group, consumer. Deleting a consumer drops its PEL, so only if empty.
_RELEASE = """
for i = 1, #KEYS do
  local p = redis.pcall('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, ARGV[2])
  if type(p) == 'table' and not p.err and #p == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], ARGV[2])
  end
end
return 1
"""

# KEYS: stream. ARGV: idle ms after which an empty consumer is removed. Trims to the
# consumption floor; returns the number of entries trimmed.
_TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function less(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for k = 1, #g, 2 do f[g[k]] = g[k + 1] end
  local low = f['last-delivered-id']
  if f['pending'] > 0 then low = redis.call('XPENDING', KEYS[1], f['name'])[2] end
  if floor == nil or less(low, floor) then floor = low end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], f['name'])) do
    local cf = {}
    for k = 1, #c, 2 do cf[c[k]] = c[k + 1] end
    if cf['pending'] == 0 and cf['idle'] > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], f['name'], cf['name'])
    end
  end
end
if floor == nil then return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0) end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""

# KEYS: routes set, direct stream, delayed set, route streams. ARGV: group.
_DROP = """
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('XGROUP', 'DESTROY', KEYS[i], ARGV[1])
    if #redis.call('XINFO', 'GROUPS', KEYS[i]) == 0 then redis.call('DEL', KEYS[i]) end
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: a stream per message. ARGV: the bodies. One round trip and one reply for a batch
# (a pipeline of XADDs costs redis-py a command to pack and a reply to read per message).
# Per message: its entry id, 0 where the stream does not exist (NOMKSTREAM), or "!" and
# the error Redis refused it with.
_PUBLISH = """
local out = {}
for i = 1, #KEYS do
  local r = redis.pcall('XADD', KEYS[i], 'NOMKSTREAM', '*', 'body', ARGV[i])
  if type(r) == 'table' and r.err then out[i] = '!' .. r.err
  elseif not r then out[i] = 0
  else out[i] = r end
end
return out
"""

_PUBLISH_CHUNK = 500  # messages per publish script call: bounds the request and how long Redis runs it
_CLOSE_DRAIN = 5.0  # seconds a close waits for the acks and publishes under way (then fails them)
_MAX_BLOCK = 1.0  # seconds one XREAD may block: below socket_timeout, and keeps sweeps on time
_IDLE_CONSUMER_MS = 3_600_000


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn redis-py's (and socket) errors into TransportError at the boundary."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise TransportError(f"redis: {what} failed: {type(exc).__name__}: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _Options:
    redis_url: str  # the URL without interplay's own options, for redis-py
    prefix: str
    trim_interval: float
    socket_timeout: float


def _parse_url(url: str) -> _Options:
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("prefix", "trim_interval"):
            ours[key] = value
        else:
            rest.append((key, value))
    # No redis-py command may wait forever on a connection that went quiet (a half-open
    # socket after a server or network failure): both timeouts default to 5 s.
    given = {key for key, _ in rest}
    rest += [(key, "5") for key in ("socket_timeout", "socket_connect_timeout") if key not in given]
    try:
        trim = float(ours.get("trim_interval", 30.0))
        timeout = float(dict(rest)["socket_timeout"])
    except ValueError as exc:
        raise ConfigurationError(f"bad option in bus URL {url!r}: {exc}") from None
    return _Options(urlunsplit(parts._replace(query=urlencode(rest))), ours.get("prefix", "ip:"), trim, timeout)


def _xadd_result(reply: Any) -> Any:
    """One message's reply from the publish script: entry id, None (no stream) or the error."""
    if reply == 0:
        return None
    if isinstance(reply, bytes):
        reply = reply.decode(errors="replace")
    if isinstance(reply, str) and reply.startswith("!"):
        return ResponseError(reply[1:])
    return reply


class RedisTransport(Transport):
    """A bus on Redis Streams (``redis://`` or ``rediss://``); see the module docs."""

    scheme = "redis"
    durable = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self.url = url
        self.options = _parse_url(url)
        self.prefix = self.options.prefix
        self._redis: Redis | None = None
        self._declared: dict[str, set[str]] = {}  # route -> groups declared through this transport
        self._groups: set[str] = set()
        self._ephemeral: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: Coalescer[tuple[str, str, str]] = Coalescer("redis", self._ack_batch)
        self._publishes: Coalescer[tuple[str, bytes]] = Coalescer("redis", self._publish_batch)
        self._scripts: dict[str, Any] = {}

    # ------------------------------------------------------------------ keys
    def stream_key(self, route: str) -> str:
        """The stream of a route."""
        return self.prefix + route

    def _key(self, kind: str, group: str) -> str:
        """A per-group key: ``group`` (direct stream), ``delayed`` (set), ``routes`` (set)."""
        return f"{self.prefix}@{kind}:{group}"

    @property
    def redis(self) -> Redis:
        """The client (after :meth:`open`)."""
        if self._redis is None:
            raise TransportError("the redis transport is not open")
        return self._redis

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # redis-py re-loads a script the server forgot (a restart) on NOSCRIPT.
        return await self._scripts[name](keys=list(keys), args=list(args))

    # ------------------------------------------------------------------ lifecycle
    async def open(self, clock: Clock) -> None:
        """Connect (and warn when the server is not configured for durability)."""
        self._redis = Redis.from_url(
            self.options.redis_url,
            # A few quick retries ride out a dropped connection or a restart in progress;
            # longer outages surface as TransportError and the runtime retries. redis-py
            # applies this at two levels (connect, then command): 2 makes 9 tries at most.
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
            health_check_interval=15,
        )
        for name, source in (("poll", _POLL), ("move", _MOVE), ("nack", _NACK), ("extend", _EXTEND),
                             ("release", _RELEASE), ("trim", _TRIM), ("drop", _DROP), ("publish", _PUBLISH)):
            self._scripts[name] = self._redis.register_script(source)
        try:
            with _translated("connect"):
                await self._redis.ping()
        except TransportError:
            await self._redis.aclose()
            self._redis = None
            raise
        try:
            config = {_text(k): _text(v) for k, v in (await self._redis.config_get("append*")).items()}
            if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
                log.warning("redis at %s is not durable (want appendonly yes, appendfsync always)", self.url)
        except RedisError:  # CONFIG may be disabled on managed servers
            pass
        if self.options.trim_interval > 0:
            self._spawn(self._trim_loop())

    async def close(self) -> None:
        """Drop the ephemeral groups declared here, stop background work, disconnect."""
        for group in list(self._ephemeral):
            try:
                await self.drop_group(group)
            except TransportError as exc:
                log.warning("could not drop ephemeral group %s: %s", group, exc)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._acks.drain(_CLOSE_DRAIN)  # what is under way goes out first
        await self._publishes.drain(_CLOSE_DRAIN)
        if self._redis is not None:
            redis, self._redis = self._redis, None
            with _translated("close"):
                await redis.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ declaring
    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Create ``group`` on each route's stream (and its direct stream) at ``$``."""
        await self._create_groups(group, routes, "$")
        self._groups.add(group)
        for route in routes:
            self._declared.setdefault(route, set()).add(group)
        if ephemeral:
            self._ephemeral.add(group)

    async def _create_groups(self, group: str, routes: Sequence[str], start: str) -> None:
        keys = [self._key("group", group), *(self.stream_key(r) for r in routes)]
        with _translated(f"declare {group}"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.xgroup_create(key, group, id=start, mkstream=True)
                if routes:
                    pipe.sadd(self._key("routes", group), *routes)
                results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" in str(result):
                continue  # declared before: keep its position
            if isinstance(result, Exception):
                raise TransportError(f"redis: declare {group} failed: {result}") from result

    async def drop_group(self, group: str) -> None:
        """Delete the group from its streams; delete streams no group reads any more."""
        with _translated(f"drop group {group}"):
            stored = await self.redis.smembers(self._key("routes", group))
            routes = {_text(r) for r in stored} | {r for r, gs in self._declared.items() if group in gs}
            keys = [self._key("routes", group), self._key("group", group), self._key("delayed", group)]
            await self._script("drop", keys + [self.stream_key(r) for r in sorted(routes)], [group])
        for groups in self._declared.values():
            groups.discard(group)
        self._groups.discard(group)
        self._ephemeral.discard(group)

    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Consume ``group`` as a new consumer of it."""
        await self.declare(group, routes)
        return _RedisSubscription(self, group, list(routes), lease)

    # ------------------------------------------------------------------ publishing
    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """``XADD`` every message in one script call (shared with concurrent publishers)."""
        if batch:
            await self._publishes.submit([(out.route, out.body) for out in batch])

    async def _publish_batch(self, items: list[tuple[str, bytes]]) -> None:
        results = await self._xadd_all(items)
        # NOMKSTREAM keeps routes nobody declared from littering Redis. A stream that a
        # group declared through here but is gone means the server lost data: declare
        # again and resend, rather than drop the message.
        lost = [i for i, (item, result) in enumerate(zip(items, results, strict=True))
                if result is None and self._declared.get(item[0])]
        if lost:
            for route in {items[i][0] for i in lost}:
                for group in self._declared[route]:
                    await self._create_groups(group, [route], "$")
            for i, result in zip(lost, await self._xadd_all([items[i] for i in lost]), strict=True):
                results[i] = result
        # A command Redis refused is about its own message (a key of the wrong type, an
        # ACL): fail only the callers whose messages it refused, not all who shared the trip.
        refused = {i: r for i, r in enumerate(results) if isinstance(r, Exception)}
        if refused:
            raise Refused("redis: publish failed", refused)

    async def _xadd_all(self, items: list[tuple[str, bytes]]) -> list[Any]:
        """XADD each item, a script call per :data:`_PUBLISH_CHUNK`; per item, its entry
        id, None (no stream) or the error."""
        results: list[Any] = []
        with _translated("publish"):
            for start in range(0, len(items), _PUBLISH_CHUNK):
                chunk = items[start:start + _PUBLISH_CHUNK]
                replies = await self._script("publish", [self.stream_key(r) for r, _ in chunk], [b for _, b in chunk])
                results += [_xadd_result(reply) for reply in replies]
        return results

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """``XADD`` to the group's direct stream."""
        with _translated(f"publish to group {group}"):
            added = await self.redis.xadd(self._key("group", group), {"body": body, "route": route}, nomkstream=True)
        if added is None:
            raise TransportError(f"redis: group {group!r} is not declared on this bus")

    async def _ack_batch(self, items: list[tuple[str, str, str]]) -> None:
        by_stream: dict[tuple[str, str], list[str]] = {}
        for key, group, entry_id in items:
            by_stream.setdefault((key, group), []).append(entry_id)
        with _translated("ack"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for (key, group), ids in by_stream.items():
                    pipe.xack(key, group, *ids)
                await pipe.execute()

    def _move_later(self, group: str, delay: float) -> None:
        keys = [self._key("delayed", group), self._key("group", group)]

        async def move() -> None:
            wait = delay
            # Re-arm only for a few ms of clock rounding; later entries have their own timers
            # or are moved by the group's consumers when they poll.
            while wait >= 0:
                await asyncio.sleep(wait)
                try:
                    due = int(await self._script("move", keys, []))
                except (RedisError, OSError, TransportError) as exc:
                    log.warning("%s: moving nacked messages failed (a consumer's next poll will): %s", group, exc)
                    return
                wait = due / 1000 if 0 <= due <= 50 else -1

        self._spawn(move())

    # ------------------------------------------------------------------ trimming
    async def _trim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.trim_interval)
            try:
                await self.trim()
            except TransportError as exc:
                log.warning("stream trim failed: %s", exc)

    async def trim(self) -> int:
        """Trim every stream declared here to its consumption floor; returns entries removed."""
        keys = [self.stream_key(r) for r in self._declared] + [self._key("group", g) for g in self._groups]
        removed = 0
        with _translated("trim"):
            for key in keys:
                removed += int(await self._script("trim", [key], [_IDLE_CONSUMER_MS]))
        return removed


class _RedisSubscription(Subscription):
    def __init__(self, transport: RedisTransport, group: str, routes: list[str], lease: float) -> None:
        self.transport = transport
        self.group = group
        self.routes = routes
        self.lease = lease
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.keys = [transport._key("group", group), *(transport.stream_key(r) for r in routes)]
        self._route_of = {transport.stream_key(r): r for r in routes}
        self._cursors = ["0-0"] * len(self.keys)
        self._claim_every = min(max(lease / 4, 0.05), 5.0)
        self._next_claim = 0.0
        self._turn = 0
        self._max_block = min(_MAX_BLOCK, transport.options.socket_timeout / 2)

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            claim = loop.time() >= self._next_claim
            entries, cursors, waits, next_due = await self._poll(max_messages, claim)
            if claim:
                self._cursors = [_text(c) for c in cursors]
                # More of the PEL left to scan: continue on the next poll, not a sweep later.
                unfinished = any(c != "0-0" for c in self._cursors)
                self._next_claim = loop.time() + (0 if unfinished else self._claim_every)
            if entries:
                return [self._delivery(*entry) for entry in entries]
            remaining = give_up - loop.time()
            if remaining <= 0:
                return []
            wait = min(remaining, self._max_block, max(0.0, self._next_claim - loop.time()))
            if next_due >= 0:
                wait = min(wait, next_due / 1000)
            with _translated(f"receive {self.group}"):
                await self.transport.redis.xread(
                    dict(zip(self.keys, (_text(w) for w in waits), strict=True)),
                    count=1, block=max(1, int(wait * 1000)),
                )

    async def _poll(self, want: int, claim: bool) -> tuple[list[Any], list[Any], list[Any], int]:
        self._turn += 1
        args = [self.group, self.consumer, want, int(claim), int(self.lease * 1000), self._turn, *self._cursors]
        keys = [self.transport._key("delayed", self.group), *self.keys]
        for attempt in (1, 2):
            try:
                with _translated(f"receive {self.group}"):
                    entries, cursors, waits, next_due = await self.transport._script("poll", keys, args)
                return entries, cursors, waits, int(next_due)
            except TransportError as exc:
                if attempt == 2 or "NOGROUP" not in str(exc):
                    raise
                # The group vanished (server lost data, or someone deleted it): declare it
                # again from the start of what is left, so nothing queued there is skipped.
                log.warning("%s: consumer group missing on redis; declaring it again", self.group)
                await self.transport._create_groups(self.group, self.routes, "0")
        raise AssertionError("unreachable")

    def _delivery(self, index: int, entry_id: bytes, flat: list[bytes], pel_count: int) -> Delivery:
        key = self.keys[index - 1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        route = self._route_of.get(key) or _text(fields.get(b"route", b"")) or None
        carried = int(fields.get(b"deliveries", 0))
        return Delivery.from_bytes(
            fields.get(b"body", b""), carried + int(pel_count), route=route, handle=(key, _text(entry_id))
        )

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.transport._acks.submit([(d.handle[0], self.group, d.handle[1]) for d in deliveries])

    async def nack(self, delivery: Delivery, delay: float) -> None:
        key, entry_id = delivery.handle
        delay_ms = max(0, int(delay * 1000))
        route = (delivery.route or "").replace("\n", " ")  # the delayed record is newline-separated
        args = [self.group, self.consumer, entry_id, delay_ms, uuid.uuid4().hex, delivery.deliveries, route,
                delivery.body]
        with _translated(f"nack {self.group}"):
            owned = await self.transport._script("nack", [key, self.transport._key("delayed", self.group)], args)
        if owned:  # else the lease was lost: another consumer has it now
            self.transport._move_later(self.group, delay_ms / 1000)

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        # Autoclaim takes entries idle for ``self.lease``: set the idle time so that happens
        # ``lease`` seconds from now. Idle time cannot be negative, so a longer ``lease``
        # than the subscription's is capped at the subscription's.
        idle_ms = max(0, int((self.lease - lease) * 1000))
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.handle[0], []).append(d.handle[1])
        with _translated(f"extend {self.group}"):
            for key, ids in by_stream.items():
                await self.transport._script("extend", [key], [self.group, self.consumer, idle_ms, *ids])

    async def close(self) -> None:
        if self.transport._redis is None:
            return  # the connection is gone: the group's other consumers claim what we held
        try:
            with _translated(f"close {self.group}"):
                await self.transport._script("release", self.keys, [self.group, self.consumer])
        except TransportError as exc:
            log.warning("%s: could not remove consumer %s: %s", self.group, self.consumer, exc)
