"""Placeholder until the workflow engine lands."""

from __future__ import annotations


class WorkflowContext:
    """The context of a workflow run."""
