"""The whole system as an AsyncAPI 3.0 document, from the map and the handlers' payload types.

* a **channel** per event (address ``event.NAME``) and per command (address
  ``command.SERVICE.COMMAND``), plus one per command for its reply (address ``null``:
  the reply goes where the command's ``reply_to`` header says);
* a **message** per channel. On every bus a message is interplay's JSON envelope, so
  the message's schema is the envelope (``components/schemas/InterplayEnvelope``) with
  its ``payload`` described by the JSON Schema of the pydantic type the handlers
  declare - the handlers' parameter annotation for what they receive, the return
  annotation of an ``emits=`` handler, :class:`~interplay.Failure` for ``on_error``;
* an **operation** per edge of the map: a service or workflow *receives* what it
  handles or waits for and *sends* what it emits or calls (commands with their reply).

Schemas that pydantic nests under ``$defs`` move to ``components/schemas`` (renamed
``Name_2`` if two different types share a name).
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

from ..message import ENVELOPE_VERSION
from ..payloads import PayloadType, resolve_hints
from ..service import Failure
from .stuck import FLOW_STUCK, FlowStuck
from .topology import Edge, Node, TopologyMap

if TYPE_CHECKING:
    from ..app import App
    from ..service import Handler

__all__ = ["ASYNCAPI_VERSION", "ENVELOPE_SCHEMA", "render_asyncapi"]

ASYNCAPI_VERSION = "3.0.0"
ENVELOPE = "InterplayEnvelope"
ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "interplay's envelope: the same JSON on every bus. The message's own data is `payload`.",
    "required": ["v", "id", "kind", "type", "flow_id", "time", "payload"],
    "properties": {
        "v": {"type": "integer", "const": ENVELOPE_VERSION, "description": "The envelope's schema version."},
        "id": {"type": "string", "description": "A UUIDv7: the key every consumer de-duplicates by."},
        "kind": {"type": "string", "enum": ["event", "command", "reply"]},
        "type": {"type": "string", "description": "The event type, the command (service.command), or for a "
                                                  "reply the command it answers."},
        "flow_id": {"type": "string", "description": "The business flow (correlation id)."},
        "causation_id": {"type": ["string", "null"], "description": "The message whose handling sent this one."},
        "source": {"type": ["string", "null"], "description": "The service (or workflow:NAME) that sent it."},
        "time": {"type": "number", "description": "When it was created, seconds since the epoch."},
        "attempt": {"type": "integer", "minimum": 1, "description": "Delivery attempt, from 1."},
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "traceparent, reply_to (commands), ..."},
        "payload": {"description": "The message's data (see each message)."},
    },
}
_REPLY_TO = "$message.payload#/headers/reply_to"


def render_asyncapi(app: App, m: TopologyMap, *, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``app`` (as JSON data), covering every message of ``m``."""
    return _Document(app, m, version).build()


class _Document:
    def __init__(self, app: App, m: TopologyMap, version: str) -> None:
        self.app = app
        self.map = m
        self.version = version
        self.schemas: dict[str, Any] = {ENVELOPE: ENVELOPE_SCHEMA}
        self.channels: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}

    def build(self) -> dict[str, Any]:
        for node in self.map.sorted_nodes():
            if node.kind == "event":
                self._event(node.name)
            elif node.kind == "command":
                self._command(node.name)
        for edge in self.map.sorted_edges():
            self._operation(edge)
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": self.app.name,
                "version": self.version,
                "description": f"The services, events and commands of the interplay app {self.app.name!r}, "
                               "generated from its code by `interplay map --format asyncapi`.",
            },
            "defaultContentType": "application/json",
            "channels": self.channels,
            "operations": self.operations,
            "components": {"schemas": self.schemas, "messages": self.messages},
        }

    # ------------------------------------------------------------------ channels and messages
    def _event(self, event: str) -> None:
        schema, origin = self._event_payload(event)
        self._channel(event, f"event.{event}", "event", schema, origin)

    def _command(self, target: str) -> None:
        handler = self._command_handler(target)
        request: dict[str, Any] = {}
        result: dict[str, Any] = {}
        origin = None
        if handler is not None:
            request = self._embed(handler.payload.schema())
            result = self._embed(_returns(handler))
            origin = f"{handler.service}.{handler.fn.__qualname__}"
        self._channel(target, f"command.{target}", "command", request, origin)
        reply = {
            "oneOf": [
                {"type": "object", "required": ["ok", "result"],
                 "properties": {"ok": {"const": True}, "result": result}},
                {"type": "object", "required": ["ok", "error"],
                 "properties": {"ok": {"const": False}, "error": self._embed(Failure.model_json_schema())}},
            ]
        }
        self._channel(f"{target}.reply", None, "reply", reply, origin, type_=target)

    def _channel(self, channel: str, address: str | None, kind: str, payload: dict[str, Any],
                 origin: str | None, *, type_: str | None = None) -> None:
        message: dict[str, Any] = {
            "name": channel,
            "title": channel,
            "summary": {"event": f"The event {channel}.", "command": f"The command {channel}.",
                        "reply": f"The reply to the command {type_}."}[kind],
            "contentType": "application/json",
            "correlationId": {"description": "The flow the message belongs to.",
                              "location": "$message.payload#/flow_id"},
            "payload": {"allOf": [
                {"$ref": f"#/components/schemas/{ENVELOPE}"},
                {"type": "object", "properties": {"kind": {"const": kind}, "type": {"const": type_ or channel},
                                                  "payload": payload}},
            ]},
        }
        if origin:
            message["x-interplay-schema-from"] = origin
        self.messages[channel] = message
        self.channels[channel] = {
            "address": address,
            "title": channel,
            "messages": {channel: {"$ref": f"#/components/messages/{channel}"}},
        }

    def _event_payload(self, event: str) -> tuple[dict[str, Any], str | None]:
        """The schema the handlers of ``event`` accept (else the one its emitters send)."""
        if event == FLOW_STUCK:
            return self._embed(FlowStuck.model_json_schema()), "interplay.tracing.stuck.FlowStuck"
        found: list[tuple[dict[str, Any], str]] = []
        for svc in sorted(self.app.services.values(), key=lambda s: s.name):
            handler = svc.events.get(event)
            if handler is not None and handler.payload.schema():
                found.append((handler.payload.schema(), f"{svc.name}.{handler.fn.__qualname__}"))
        if not found:
            for svc in sorted(self.app.services.values(), key=lambda s: s.name):
                for handler in svc.events.values():
                    if handler.on_error == event:
                        found.append((Failure.model_json_schema(), f"{svc.name}.{handler.fn.__qualname__}"))
                    elif handler.emits == event and _returns(handler):
                        found.append((_returns(handler), f"{svc.name}.{handler.fn.__qualname__}"))
        distinct: list[dict[str, Any]] = []
        for schema, _ in found:
            if schema not in distinct:
                distinct.append(schema)
        if not distinct:
            return {}, None
        origin = ", ".join(sorted({o for _, o in found}))
        if len(distinct) == 1:
            return self._embed(distinct[0]), origin
        return {"anyOf": [self._embed(s) for s in distinct]}, origin

    def _command_handler(self, target: str) -> Handler | None:
        svc_name, _, command = target.partition(".")
        svc = self.app.services.get(svc_name)
        return svc.commands.get(command) if svc is not None else None

    # ------------------------------------------------------------------ operations
    def _operation(self, edge: Edge) -> None:
        message_node, actor = (edge.target, edge.source) if edge.target.kind in ("event", "command") else (
            edge.source, edge.target)
        if message_node.kind not in ("event", "command") or actor.kind not in ("service", "workflow", "system"):
            return  # clients are outside the system described
        receives = edge.target is actor
        action = "receive" if receives else "send"
        channel = message_node.name
        op: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "title": f"{_actor(actor)} {', '.join(sorted(edge.relations))} {channel}",
            "messages": [{"$ref": f"#/channels/{channel}/messages/{channel}"}],
        }
        summary = self._summary(actor, edge)
        if summary:
            op["summary"] = summary
        if actor.kind == "service":
            op["tags"] = [{"name": actor.name}]
        if message_node.kind == "command":
            op["reply"] = {
                "address": {"description": "The caller's reply route (the command's reply_to header).",
                            "location": _REPLY_TO},
                "channel": {"$ref": f"#/channels/{channel}.reply"},
                "messages": [{"$ref": f"#/channels/{channel}.reply/messages/{channel}.reply"}],
            }
        prefix = actor.name if actor.kind == "service" else f"{actor.kind}.{actor.name}"
        self.operations[f"{prefix}.{action}.{channel}"] = op

    def _summary(self, actor: Node, edge: Edge) -> str | None:
        fn: Any = None
        if actor.kind == "workflow":
            spec = self.app.workflows.get(actor.name)
            fn = spec.fn if spec is not None else None
        elif actor.kind == "service" and edge.target is actor:
            svc = self.app.services.get(actor.name)
            if svc is not None:
                name = edge.source.name
                handler = svc.events.get(name) if edge.source.kind == "event" else next(
                    (h for h in svc.commands.values() if h.topic == name), None)
                fn = handler.fn if handler is not None else None
        doc = inspect.getdoc(fn) if fn is not None else None
        return doc.strip().splitlines()[0] if doc else None

    # ------------------------------------------------------------------ schemas
    def _embed(self, schema: dict[str, Any]) -> dict[str, Any]:
        """A pydantic JSON Schema made to fit the document: ``$defs`` into components/schemas,
        a named object schema referenced from there."""
        if not schema:
            return {}
        schema = copy.deepcopy(schema)
        defs: dict[str, Any] = schema.pop("$defs", {})
        same = {name: name for name in defs}  # compare bodies as they are stored: references rewritten
        names = {name: self._free_name(name, _rewrite(body, same)) for name, body in defs.items()}
        for name, body in defs.items():
            self.schemas[names[name]] = _rewrite(body, names)
        schema = _rewrite(schema, names)
        title = schema.get("title")
        if isinstance(title, str) and schema.get("type") == "object" and "properties" in schema:
            name = self._free_name(title, schema)
            self.schemas[name] = schema
            return {"$ref": f"#/components/schemas/{name}"}
        return schema

    def _free_name(self, name: str, body: Any) -> str:
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "Schema"
        candidate, n = base, 2
        while candidate in self.schemas and self.schemas[candidate] != body:
            candidate, n = f"{base}_{n}", n + 1
        return candidate


def _rewrite(value: Any, names: dict[str, str]) -> Any:
    """``#/$defs/X`` references pointed at ``#/components/schemas/<new name of X>``."""
    if isinstance(value, dict):
        out = {k: _rewrite(v, names) for k, v in value.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            out["$ref"] = f"#/components/schemas/{names.get(name, name)}"
        return out
    if isinstance(value, list):
        return [_rewrite(v, names) for v in value]
    return value


def _returns(handler: Handler) -> dict[str, Any]:
    """The JSON Schema of a handler's return annotation ({} when it has none)."""
    annotation = resolve_hints(handler.fn).get("return", inspect.Parameter.empty)
    if annotation in (None, type(None)):
        return {"type": "null"}
    return PayloadType(annotation).schema()


def _actor(node: Node) -> str:
    return {"service": "service", "workflow": "workflow", "system": "the runtime"}[node.kind] + (
        f" {node.name}" if node.kind != "system" else "")
