"""The public names are a contract (DESIGN.md); changing them is a decision, not an accident."""

from __future__ import annotations

import interplay


def test_all_is_pinned() -> None:
    assert sorted(interplay.__all__) == interplay.__all__
    for name in interplay.__all__:
        assert hasattr(interplay, name), name
    design_names = {
        "App", "Service", "Context", "Message", "Flow", "Failure", "Retry", "Reject",
        "InterplayError", "MessageDecodeError", "ValidationFailed", "StepFailed", "StepTimeout",
        "NonDeterminismError", "WorkflowCancelled",
    }
    assert design_names <= set(interplay.__all__)


def test_every_error_is_an_interplay_error() -> None:
    for name in interplay.__all__:
        obj = getattr(interplay, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, interplay.InterplayError), name
