"""amqp:// packs: the body format and which messages go out together."""

from __future__ import annotations

import pytest

from interplay.transports.amqp_pack import pack, plan, unpack


@pytest.mark.parametrize("bodies", [[b"a"], [b"one", b"", b"three" * 1000], [bytes(range(256)) * 3] * 5])
def test_a_pack_unpacks_to_its_messages_in_order(bodies: list[bytes]) -> None:
    assert unpack(pack(bodies)) == bodies


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00", b"\x00\x00\x00\x05abcd", b"\x00\x00\x00\x01a\x00",
                                  b'{"id": "not a pack"}'])
def test_a_body_that_is_not_a_pack_is_refused_whole(body: bytes) -> None:
    assert unpack(body) is None


def test_one_route_goes_in_packs_of_at_most_the_most_each_route_in_its_order() -> None:
    routes = ["a", "b", "a", "a", "c", "a", "b"]
    bodies = [b"x"] * len(routes)
    assert plan(routes, bodies, 3, 1000) == [("a", [0, 2, 3]), ("a", [5]), ("b", [1, 6]), ("c", [4])]


def test_a_pack_stays_within_the_byte_limit_and_a_larger_message_goes_alone() -> None:
    bodies = [b"x" * 40, b"x" * 40, b"x" * 200, b"x" * 10, b"x" * 10]
    got = plan(["r"] * 5, bodies, 64, 100)
    assert got == [("r", [0, 1]), ("r", [2]), ("r", [3, 4])]
    assert all(len(pack([bodies[i] for i in indices])) <= 100 for _, indices in got if len(indices) > 1)


@pytest.mark.parametrize("most", [0, 1])
def test_packing_off_publishes_each_message_alone(most: int) -> None:
    assert plan(["r", "r"], [b"1", b"2"], most, 1000) == [("r", [0]), ("r", [1])]
