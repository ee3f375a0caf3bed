"""Test harness for apps built with interplay.

* :func:`wait_until` - wait on a condition with a deadline (never sleep-and-hope).
* :class:`VirtualClock` - time that moves only when the test says so.
"""

from __future__ import annotations

from .clock import VirtualClock
from .waiting import wait_until

__all__ = ["VirtualClock", "wait_until"]
