"""Registration: services, handlers, names, retry policy, payload validation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from interplay import App, ConfigurationError, Context, Retry, ValidationFailed
from interplay.payloads import PayloadType, remembered, to_json


class Order(BaseModel):
    id: int
    amount: float = 0.0


@dataclass
class Parcel:
    weight: float


class Note(TypedDict):
    text: str


def test_decorators_record_and_return_the_function() -> None:
    app = App("shop")
    payments = app.service("payments")

    @payments.on("order.created", emits="payment.completed", on_error="payment.failed")
    @payments.command("process_payment")
    async def take_payment(order: Order, ctx: Context) -> Order:
        return order

    handler = payments.events["order.created"]
    assert handler.fn is take_payment
    assert handler.emits == "payment.completed"
    assert handler.on_error == "payment.failed"
    assert handler.ctx_param == "ctx"
    assert handler.payload_param == "order"
    assert payments.commands["process_payment"].topic == "payments.process_payment"
    assert app.command_handler("payments.process_payment").fn is take_payment


def test_one_handler_per_event_and_service() -> None:
    svc = App("a").service("s")
    svc.on("x")(lambda p: None)
    with pytest.raises(ConfigurationError, match="already handles"):
        svc.on("x")(lambda p: None)


@pytest.mark.parametrize("name", ["", "has space", "wild.*", "trailing.", "a..b", "x>"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid event name"):
        App("a").service("s").on(name)


def test_reserved_service_names() -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        App("a").service("_engine")


def test_unknown_command_lists_known_ones() -> None:
    app = App("a")
    app.service("s").command("do")(lambda p: None)
    with pytest.raises(ConfigurationError, match=r"known: \['s.do'\]"):
        app.command_handler("s.undo")


def test_retry_backoff_grows_and_is_capped() -> None:
    policy = Retry(attempts=10, backoff=1.0, max_backoff=5.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = Retry(backoff=1.0, max_backoff=100.0)
    assert all(0.5 <= jittered.delay(1) <= 1.5 for _ in range(100))
    with pytest.raises(ConfigurationError):
        Retry(attempts=0)


@pytest.mark.parametrize(
    ("annotation", "good", "bad"),
    [
        (Order, {"id": 1, "amount": 2.5}, {"id": "one"}),
        (Parcel, {"weight": 2.5}, {"weight": "heavy"}),
        (Note, {"text": "hi"}, {"txt": "hi"}),
        (dict, {"any": 1}, [1]),
        (int, 5, "five"),
    ],
)
def test_payload_validation_by_annotation(annotation: object, good: object, bad: object) -> None:
    ptype = PayloadType(annotation)
    assert to_json(ptype.validate(good)) == good
    with pytest.raises(ValidationFailed):
        ptype.validate(bad)


def test_validation_error_names_the_field() -> None:
    with pytest.raises(ValidationFailed, match=r"Order: id: Field required"):
        PayloadType(Order).validate({"amount": 1})


def test_flow_declaration() -> None:
    app = App("a")
    spec = app.flow("order", starts="order.created", ends=["shipped"], fails="failed", within=5)
    assert spec.starts == ("order.created",)
    assert app.topology.completes["shipped"] == ("order",)
    with pytest.raises(ConfigurationError):
        app.flow("order", starts="x")
    with pytest.raises(ConfigurationError):
        app.flow("other", starts="x", within=0)


def test_handlers_defined_inside_functions_resolve_what_they_can() -> None:
    # Under `from __future__ import annotations`, a type imported inside the defining
    # function is not resolvable later; the handler still registers, and the payload
    # type that can be resolved is used.
    def define() -> App:
        from interplay import WorkflowContext as LocalContext

        app = App("local")

        @app.workflow("wf")
        async def wf(ctx: LocalContext, n: int) -> int:
            return n

        return app

    spec = define().workflows["wf"]
    assert spec.ctx_param == "ctx"
    assert spec.payload.validate("5") == 5


def test_remembered_computes_an_unhashable_argument_each_time_and_remembers_the_rest() -> None:
    calls: list[object] = []

    @remembered(8)
    def length(value: object) -> int:
        calls.append(value)
        return len(value)  # type: ignore[arg-type]

    assert [length("ab"), length("ab"), length(["x"]), length(["x"])] == [2, 2, 1, 1]
    assert calls == ["ab", ["x"], ["x"]]
    with pytest.raises(TypeError):  # a TypeError of the function itself is not swallowed
        length(3)
