"""``interplay map --format asyncapi``: a well-formed AsyncAPI 3.0 document whose schemas are the models'."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from interplay import App, Failure
from interplay.examples import orders, trip
from interplay.tracing.asyncapi import ENVELOPE_SCHEMA, render_asyncapi
from interplay.tracing.topology import declared_map

COMPONENT_KEY = re.compile(r"^[a-zA-Z0-9.\-_]+$")  # AsyncAPI 3.0: keys of the Components Object


def document(app: App) -> dict[str, Any]:
    return render_asyncapi(app, declared_map(app))


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """Follow a local ``#/a/b`` reference (JSON Pointer), or fail the test."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"dangling reference {ref}"
        assert part in node, f"dangling reference {ref}"
        node = node[part]
    return node


def refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


def payload_schema(doc: dict[str, Any], message: str) -> Any:
    """The schema of a message's ``payload`` field (inside the envelope), references followed."""
    envelope, own = doc["components"]["messages"][message]["payload"]["allOf"]
    assert envelope == {"$ref": "#/components/schemas/InterplayEnvelope"}
    schema = own["properties"]["payload"]
    return resolve(doc, schema["$ref"]) if "$ref" in schema else schema


def test_the_orders_document_is_well_formed() -> None:
    doc = document(orders.app)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "shop"
    assert doc["info"]["version"]
    for ref in refs(doc):
        resolve(doc, ref)
    for key in ("schemas", "messages"):
        assert all(COMPONENT_KEY.match(k) for k in doc["components"][key])
    events = {"order.created", "payment.completed", "payment.failed", "payment.refunded", "shipment.prepared",
              "shipment.failed", "customer.notified", "order.cancelled", "order.shipped", "delivery.confirmed"}
    commands = {"payments.process_payment", "payments.refund", "shipping.prepare_shipment",
                "notification.send_confirmation"}
    assert set(doc["channels"]) == events | commands | {f"{c}.reply" for c in commands}
    for event in events:
        assert doc["channels"][event]["address"] == f"event.{event}"
    for command in commands:
        assert doc["channels"][command]["address"] == f"command.{command}"
        assert doc["channels"][f"{command}.reply"]["address"] is None  # where reply_to says
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        channel = op["channel"]["$ref"].removeprefix("#/channels/")
        # an operation's messages must be messages of its own channel
        assert all(m["$ref"].startswith(f"#/channels/{channel}/messages/") for m in op["messages"]), op_id
        if channel in commands:
            assert op["reply"]["channel"] == {"$ref": f"#/channels/{channel}.reply"}
            assert op["reply"]["address"]["location"] == "$message.payload#/headers/reply_to"
    assert {"payments.receive.order.created", "payments.send.payment.completed", "payments.send.payment.failed",
            "payments.receive.payments.process_payment", "workflow.process_order.send.payments.refund",
            "workflow.deliver_order.send.order.shipped", "workflow.deliver_order.receive.delivery.confirmed",
            "notification.send.customer.notified"} <= set(doc["operations"])
    assert len(doc["operations"]) == 26  # one per edge of the map
    assert doc["operations"]["payments.receive.order.created"]["summary"] == (
        "Charge the customer; a non-positive amount is refused for good.")
    assert doc["components"]["schemas"]["InterplayEnvelope"] == ENVELOPE_SCHEMA


def test_schemas_come_from_the_handlers_models() -> None:
    doc = document(orders.app)
    schemas = doc["components"]["schemas"]
    assert schemas["Order"] == orders.Order.model_json_schema()
    assert schemas["Order"]["properties"]["amount"]["description"] == "what the customer pays"
    assert payload_schema(doc, "order.created") == orders.Order.model_json_schema()  # what payments accepts
    assert payload_schema(doc, "payment.failed") == Failure.model_json_schema()  # what orders accepts
    assert payload_schema(doc, "payment.refunded") == orders.Refund.model_json_schema()  # nobody handles it:
    # the return annotation of the handler that emits it
    assert payload_schema(doc, "customer.notified") == {}  # sent by ctx.emit, handled by nobody: any JSON
    reply = payload_schema(doc, "payments.refund.reply")
    ok, error = reply["oneOf"]
    assert resolve(doc, ok["properties"]["result"]["$ref"]) == orders.Refund.model_json_schema()
    assert resolve(doc, error["properties"]["error"]["$ref"]) == Failure.model_json_schema()
    assert payload_schema(doc, "notification.send_confirmation.reply")["oneOf"][0]["properties"]["result"] == {
        "type": "null"}
    message = doc["components"]["messages"]["order.created"]
    assert message["correlationId"]["location"] == "$message.payload#/flow_id"
    assert message["x-interplay-schema-from"] == "payments.take_payment"


def test_nested_models_move_to_components() -> None:
    doc = document(trip.app)
    for ref in refs(doc):
        resolve(doc, ref)
    assert "$defs" not in str(doc)
    booking = doc["components"]["schemas"]["Booking"]
    assert booking["properties"]["trip"] == {"$ref": "#/components/schemas/Trip"}
    assert doc["components"]["schemas"]["Trip"]["properties"]["fail_at"]["anyOf"][0]["enum"] == [
        "flight", "hotel", "car"]


def test_two_models_with_one_name_both_survive() -> None:
    class Order(BaseModel):  # not orders.Order: other fields
        reference: str

    app = App("names")
    app.service("a").on("one.happened")(_take(orders.Order))
    app.service("b").on("two.happened")(_take(Order))
    doc = document(app)
    schemas = doc["components"]["schemas"]
    assert schemas["Order"] == orders.Order.model_json_schema()
    assert schemas["Order_2"] == Order.model_json_schema()
    assert payload_schema(doc, "two.happened") == Order.model_json_schema()


def _take(model: type[BaseModel]) -> Any:
    async def handler(payload: Any) -> None: ...

    handler.__annotations__ = {"payload": model, "return": None}
    return handler
