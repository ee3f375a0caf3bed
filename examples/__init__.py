"""Runnable examples; the code lives in ``interplay.examples`` so the demo ships with it."""
