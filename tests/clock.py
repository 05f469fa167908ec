"""A monotonic clock that moves only when a test moves it, for code that takes
its clock (the heartbeat): an age is what the test set, however loaded the
machine, and the reads it counts tell how often the code under test looked."""
from __future__ import annotations


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
