"""Example systems shipped with interplay (also used by ``interplay demo``)."""
