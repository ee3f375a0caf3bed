"""A travel booking - flight, hotel, car - as a saga, in both styles.

If any booking fails, the ones already made are cancelled, in reverse order.

* **Orchestration**: the workflow ``book_trip`` books each leg by command and
  registers its cancellation as a compensation; when a leg fails the saga cancels
  the others (car, then hotel, then flight - whatever had been booked).
* **Choreography**: ``trip.requested`` -> flights -> ``flight.booked`` -> hotels ->
  ``hotel.booked`` -> cars -> ``car.booked`` -> ``trip.confirmed``. A failed leg emits
  its ``*.failed`` event and each earlier leg reacts by cancelling its booking, which
  in turn tells the leg before it.

A trip fails at the leg named in ``fail_at`` (to see the compensations run).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, WorkflowContext

app = App("travel")
flights = app.service("flights")
hotels = app.service("hotels")
cars = app.service("cars")
trips = app.service("trips")

Leg = Literal["flight", "hotel", "car"]


class Trip(BaseModel):
    """What the traveller asked for."""

    id: int
    traveller: str
    destination: str = "Lisbon"
    fail_at: Leg | None = None


class Booking(BaseModel):
    """One leg booked (the trip rides along, for the next leg)."""

    trip: Trip
    leg: Leg
    reference: str


def _book(trip: Trip, leg: Leg) -> Booking:
    if trip.fail_at == leg:
        raise Reject(f"no {leg} available for trip {trip.id} to {trip.destination}")
    return Booking(trip=trip, leg=leg, reference=f"{leg[0].upper()}-{trip.id}")


# --- the services' booking and cancelling, usable by command and by event ---
@flights.command("book")
@flights.on("trip.requested", emits="flight.booked", on_error="trip.failed")
async def book_flight(trip: Trip) -> Booking:
    """Book the flight."""
    return _book(trip, "flight")


@hotels.command("book")
async def book_hotel(trip: Trip) -> Booking:
    """Book the hotel."""
    return _book(trip, "hotel")


@cars.command("book")
async def book_car(trip: Trip) -> Booking:
    """Book the car."""
    return _book(trip, "car")


@flights.command("cancel")
async def cancel_flight(booking: Booking) -> str:
    """Cancel a flight booking (idempotent by its reference)."""
    return f"cancelled {booking.reference}"


@hotels.command("cancel")
async def cancel_hotel(booking: Booking) -> str:
    """Cancel a hotel booking."""
    return f"cancelled {booking.reference}"


@cars.command("cancel")
async def cancel_car(booking: Booking) -> str:
    """Cancel a car booking."""
    return f"cancelled {booking.reference}"


# --- orchestration: one workflow, compensations in a saga ---
@app.workflow("book_trip")
async def book_trip(ctx: WorkflowContext, trip: Trip) -> list[str]:
    """Book flight, hotel and car; cancel what was booked if any leg fails."""
    references = []
    async with ctx.saga() as saga:
        for leg, service in (("flight", "flights"), ("hotel", "hotels"), ("car", "cars")):
            booking = await ctx.call(f"{service}.book", trip, returns=Booking)
            saga.compensate(f"{service}.cancel", booking)
            references.append(booking.reference)
            ctx.logger.info("booked %s for trip %s", leg, trip.id)
    return references


# --- choreography: each leg reacts to the previous one, compensations travel back ---
@hotels.on("flight.booked", emits="hotel.booked", on_error="hotel.failed")
async def hotel_after_flight(flight: Booking) -> Booking:
    """The flight is booked: book the hotel."""
    return await book_hotel(flight.trip)


@cars.on("hotel.booked", emits="car.booked", on_error="car.failed")
async def car_after_hotel(hotel: Booking, ctx: Context) -> Booking:
    """The hotel is booked: book the car."""
    return await book_car(hotel.trip)


@trips.on("car.booked", emits="trip.confirmed")
async def confirm_trip(car: Booking) -> Trip:
    """Every leg is booked."""
    return car.trip


@hotels.on("car.failed", emits="hotel.cancelled")
async def hotel_compensates(failure: Failure, ctx: Context) -> Booking:
    """No car: cancel the hotel (its booking is the failed message's payload)."""
    hotel = Booking.model_validate(failure.payload)
    await cancel_hotel(hotel)
    return hotel


@flights.on("hotel.failed", emits="flight.cancelled")
async def flight_compensates_hotel(failure: Failure) -> Booking:
    """No hotel: cancel the flight."""
    flight = Booking.model_validate(failure.payload)
    await cancel_flight(flight)
    return flight


@flights.on("hotel.cancelled", emits="flight.cancelled")
async def flight_compensates_car(hotel: Booking) -> Booking:
    """The hotel was cancelled (no car): cancel the flight too."""
    flight = Booking(trip=hotel.trip, leg="flight", reference=f"F-{hotel.trip.id}")
    await cancel_flight(flight)
    return flight


@trips.on("flight.cancelled", emits="trip.cancelled")
async def trip_cancelled(flight: Booking) -> Trip:
    """Everything booked was cancelled."""
    return flight.trip


app.flow(
    "trip",
    starts="trip.requested",
    ends="trip.confirmed",
    fails=["trip.failed", "hotel.failed", "car.failed"],  # compensations still show in the trace
    within=120,
)
