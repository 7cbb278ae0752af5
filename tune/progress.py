"""Progress of a Ray Train run into its job row, written from the Train controller.

Ray Train calls `UserCallback.after_report` on its controller actor after every report (all ranks),
so the callback carries only what it needs to reopen the control plane there: settings, job, tenant
and attempt. Writes are fenced by attempt, as in the in-process runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from ray.train import UserCallback

from cluster.config import ControlPlaneSettings


@dataclass(frozen=True)
class ProgressTarget:
    settings: ControlPlaneSettings
    job_id: str
    tenant: str
    attempt: int

    @classmethod
    def from_run_callbacks(cls, callbacks) -> "ProgressTarget | None":
        plane = getattr(callbacks, "plane", None)
        if plane is None:
            return None
        return cls(settings=plane.settings, job_id=callbacks.job_id, tenant=callbacks.tenant, attempt=callbacks.attempt)


class JobProgressCallback(UserCallback):
    def __init__(self, target: ProgressTarget):
        self.target = target
        self._fenced = None
        self._last_resume = None

    def _callbacks(self):
        if self._fenced is None:
            from cluster.runner import _RunCallbacks
            from cluster.service import ControlPlane

            target = self.target
            self._fenced = _RunCallbacks(ControlPlane.open(target.settings), target.job_id, target.tenant, target.attempt)
        return self._fenced

    def _record_resume(self, fenced, step: int) -> None:
        """A restarted worker group picked up the run at `step`: the job's events say so."""
        import time

        from cluster.states import add_event

        with fenced.plane.db.write() as session:
            add_event(session, job_id=self.target.job_id, tenant=self.target.tenant, at=time.time(), kind="log",
                      message=f"workers restarted; resumed from the checkpoint at step {step}",
                      data={"resumed_from": step, "attempt": self.target.attempt})

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics:
            return
        head = metrics[0]
        fenced = self._callbacks()
        resumed = head.get("resumed_from", -1)
        if resumed is not None and resumed >= 0 and resumed != self._last_resume:
            self._last_resume = resumed
            self._record_resume(fenced, resumed)
        terms = {k: head[k] for k in ("cdm", "attn", "cst", "text") if k in head}
        info = SimpleNamespace(step=head["step"], total_steps=head["total_steps"], loss=head["loss"], terms=terms,
                               seconds_per_step=head.get("seconds_per_step", 0.0), eta_seconds=head.get("eta_seconds", 0.0))
        fenced.on_step(info)
        if checkpoint is not None:
            fenced.on_checkpoint(head["step"], checkpoint.path)
