"""How the death of an actor-group worker is reported: which group, which worker, doing what."""

from __future__ import annotations


class WorkerDied(RuntimeError):
    """A worker of an actor group died and was not restarted (a learner or reference rank, or a worker
    whose group has used its restarts)."""

    def __init__(self, group: str, index: int, method: str | None, why_not_restarted: str = "") -> None:
        self.group, self.index, self.method = group, index, method
        role = "rank" if group in ("learner", "reference") else "worker"
        during = f" during {method}" if method else ""
        super().__init__(f"{group} {role} {index} died{during}" + (f" ({why_not_restarted})" if why_not_restarted else ""))
