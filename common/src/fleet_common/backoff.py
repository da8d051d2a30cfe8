"""Reconnect and retry delays, for the MQTT link and for the stores alike: no MQTT here, so a
store can wait for its server without loading paho."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with 'equal jitter': a delay in [d/2, d], d doubling up to a cap."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s, self.attempt = max(min_s, 0.01), max(max_s, min_s), 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempt, 20)))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
