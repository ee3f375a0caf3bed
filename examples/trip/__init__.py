"""A travel-booking saga in both styles: see ``interplay/examples/trip.py`` for the code.

``interplay run examples.trip:app`` (from the repository root) and
``interplay run interplay.examples.trip:app`` (anywhere) run the same app.
"""

from interplay.examples.trip import Booking, Trip, app

__all__ = ["Booking", "Trip", "app"]
