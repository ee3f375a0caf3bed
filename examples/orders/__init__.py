"""The seed's order flow in three styles: see ``interplay/examples/orders.py`` for the code.

``interplay run examples.orders:app`` (from the repository root) and
``interplay run interplay.examples.orders:app`` (anywhere) run the same app.
"""

from interplay.examples.orders import Order, app

__all__ = ["Order", "app"]
