"""Every error interplay raises, in one hierarchy.

```
InterplayError                      base of everything below
├── ConfigurationError              a bad URL, an unknown service, workflow or command
├── NotFound                        no flow, run or dead letter with that id (also a LookupError)
├── MessageDecodeError              bytes that are not a valid envelope (alias: InvalidMessage)
├── ValidationFailed                a payload that does not fit the handler's annotation
├── Reject                          raised by a handler: fail permanently, never retry
├── TransportError                  the bus failed (driver errors are translated to this)
├── StoreError                      the store failed (driver errors are translated to this)
│   └── SchemaVersionError          the database was written by a newer interplay
├── StepFailed                      a workflow step or command failed (carries the remote error)
│   └── StepTimeout                 ...or did not answer in time
├── NonDeterminismError             replay diverged from the journal; the run is parked
├── WorkflowCancelled               the run was cancelled
└── WorkflowFailed                  `handle.result()` of a run that did not complete
```

Driver exceptions (sqlite3, redis-py, asyncpg, ...) never reach users: each backend
translates them at its boundary with ``raise TransportError(...) from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "InterplayError",
    "InvalidMessage",
    "MessageDecodeError",
    "MessageTooLarge",
    "NonDeterminismError",
    "NotFound",
    "Reject",
    "SchemaVersionError",
    "StepFailed",
    "StepTimeout",
    "StoreError",
    "TransportError",
    "ValidationFailed",
    "WorkflowCancelled",
    "WorkflowFailed",
]


class InterplayError(Exception):
    """Base class of every error raised by interplay."""


class ConfigurationError(InterplayError):
    """The app or runtime was configured wrongly (bad URL, unknown name, bad signature)."""


class NotFound(InterplayError, LookupError):
    """No flow, workflow run or dead letter has the given id."""


class MessageDecodeError(InterplayError):
    """Bytes on the bus are not a valid interplay envelope; the message says why."""


InvalidMessage = MessageDecodeError


class ValidationFailed(InterplayError):
    """A payload did not validate against the type a handler or workflow declares."""


class Reject(InterplayError):
    """Raise from a handler to fail the message permanently: no retry, straight to the DLQ.

    For an ``.on`` handler the ``on_error`` event is emitted; for a ``.command``
    handler the caller's step fails with :class:`StepFailed`.
    """


class TransportError(InterplayError):
    """The bus failed: connection lost, publish not confirmed, broker refused."""


class MessageTooLarge(TransportError):
    """A message larger than the bus ever takes: refused before anything was stored."""


class StoreError(InterplayError):
    """The store failed: the database is unreachable, locked, or corrupt."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this version of interplay understands."""


class StepFailed(InterplayError):
    """A workflow step or a command failed.

    Attributes:
        step: what failed, e.g. ``"payments.process_payment"``.
        error_type: the remote exception's class name.
        error: the remote exception's message.
        details: the remote ``Failure`` as a dict, when there is one.
    """

    def __init__(
        self,
        step: str,
        error_type: str,
        error: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{step} failed: {error_type}: {error}")
        self.step = step
        self.error_type = error_type
        self.error = error
        self.details = details or {}


class StepTimeout(StepFailed):
    """A workflow step, command or wait did not finish within its timeout."""

    def __init__(self, step: str, timeout: float) -> None:
        super().__init__(step, "StepTimeout", f"no answer within {timeout:g}s")
        self.timeout = timeout


class NonDeterminismError(InterplayError):
    """Replaying a workflow diverged from its journal; the run is parked, not continued."""


class WorkflowCancelled(InterplayError):
    """The workflow run was cancelled."""


class WorkflowFailed(InterplayError):
    """A workflow run ended without a result.

    Attributes:
        run_id: the run.
        status: ``failed``, ``compensated``, ``cancelled`` or ``parked``.
        error_type: the class name of the error that ended it.
        error: its message.
    """

    def __init__(self, run_id: str, status: str, error_type: str, error: str) -> None:
        super().__init__(f"workflow run {run_id} {status}: {error_type}: {error}")
        self.run_id = run_id
        self.status = status
        self.error_type = error_type
        self.error = error
