"""interplay: microservices that work together by choreography and orchestration.

One service codebase for both styles: services react to events on a bus
(choreography) and answer commands sent by durable workflows (orchestration), on an
embedded SQLite default or on Redis, NATS, RabbitMQ and PostgreSQL - and every flow,
in either style, can be traced end to end.
"""

from __future__ import annotations

import logging

from .app import App
from .context import Context
from .errors import (
    ConfigurationError,
    InterplayError,
    InvalidMessage,
    MessageDecodeError,
    MessageTooLarge,
    NonDeterminismError,
    NotFound,
    Reject,
    StepFailed,
    StepTimeout,
    StoreError,
    TransportError,
    ValidationFailed,
    WorkflowCancelled,
    WorkflowFailed,
)
from .message import Message
from .runtime import Runtime, RuntimeOptions
from .service import Failure, Retry, Service
from .stores.tx import Transaction
from .tracing.flows import Flow, FlowSummary
from .workflow.context import ChildHandle, Saga, WorkflowContext
from .workflow.handle import WorkflowHandle

__version__ = "0.1.0"

# A library does not configure logging; without a handler, Python's last-resort
# handler would print our warnings on stderr.
logging.getLogger("interplay").addHandler(logging.NullHandler())

__all__ = [
    "App",
    "ChildHandle",
    "ConfigurationError",
    "Context",
    "Failure",
    "Flow",
    "FlowSummary",
    "InterplayError",
    "InvalidMessage",
    "Message",
    "MessageDecodeError",
    "MessageTooLarge",
    "NonDeterminismError",
    "NotFound",
    "Reject",
    "Retry",
    "Runtime",
    "RuntimeOptions",
    "Saga",
    "Service",
    "StepFailed",
    "StepTimeout",
    "StoreError",
    "Transaction",
    "TransportError",
    "ValidationFailed",
    "WorkflowCancelled",
    "WorkflowContext",
    "WorkflowFailed",
    "WorkflowHandle",
]
