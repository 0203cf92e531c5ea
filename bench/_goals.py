"""The one line each performance goal prints (issue "Performance"): ``goal NAME: measured X,
target Y, met`` (or ``short``), so the state can be read at a glance across ``make bench``."""

from __future__ import annotations


def goal(name: str, measured: float, target: float, *, at_most: bool = False, unit: str = "") -> bool:
    """Print the goal's line; True when met (``measured >= target``, or ``<=`` with ``at_most``)."""
    met = measured <= target if at_most else measured >= target
    sign = "<=" if at_most else ">="
    print(f"goal {name}: measured {measured:.3f}{unit}, target {sign} {target:.3f}{unit}, {'met' if met else 'short'}")
    return met
