"""A stand-in for :class:`kfac_lab.train.Session` with the attributes a monitor reads: the
monitor's tests drive it by hand (no thread, no optimizer), so every value is known."""
from __future__ import annotations

import queue
from types import SimpleNamespace


class FakeSession:
    def __init__(self, run_id="20260101-000000-aaaa", optimizer_name="kfac", approx="blockdiag", momentum=True):
        self.run_id, self.optimizer_name = run_id, optimizer_name
        self.updates: queue.Queue = queue.Queue()
        self.step, self.wall_time, self.status, self.error = 0, 0.0, "idle", None
        self.last_metrics: dict = {}
        self.optimizer = SimpleNamespace(config=SimpleNamespace(approx=approx, momentum=momentum))
        self.sets: list[dict] = []

    def summary(self) -> dict:
        return {"error": self.last_metrics.get("error")}

    def set(self, **changes) -> None:
        self.sets.append(changes)

    def emit(self, step: int, seconds: float, events=(), **metrics) -> dict:
        """One step's update, as the training thread publishes it."""
        self.step, self.wall_time, self.status = step, seconds, "running"
        item = {"run_id": self.run_id, "step": step, "wall_time": seconds, **metrics}
        if events:
            item["events"] = [dict(e) for e in events]
        self.last_metrics = {**self.last_metrics, **metrics}
        self.updates.put(item)
        return item
