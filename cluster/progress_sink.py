"""The attempt's fenced line to its job row (`ProgressSink`), in a module of its own because it travels.

The sink pickles (settings and ids) into the processes of a Ray Train run: the Train controller unpickles it inside
the run's progress callback (`tune.progress`) and each Train worker inside its config (rank 0 publishes previews
through it), both before the run's first step. So this module imports nothing of the database at import time:
SQLAlchemy, the ORM rows, quotas and the control plane are imported by the first write, after step 1. Importing
`cluster.runner` instead cost each of those two processes 0.7-0.8 s on their way to step 1 (BENCHMARKS, "time to
first step"); `tests/cluster/test_progress_sink.py` fails if the import comes back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from causalt2i.callbacks import StepInfo
from cluster.config import ControlPlaneSettings

if TYPE_CHECKING:
    from cluster.service import ControlPlane


class ProgressSink:
    """The attempt's fenced line to its job row: progress, checkpoints, diagnostics, heartbeats and resumes.

    It implements the trainer's callback protocol (`causalt2i.callbacks.TrainerCallback`), so the in-process
    trainer takes it as a callback, and it pickles (settings and ids only; the database handle is reopened
    where it lands), so a Ray Train controller or a Tune callback on another process writes through a copy.
    Each copy learns on its own that the row was lost (a fenced write matched nothing) and says so through
    `should_stop`.
    """

    def __init__(self, settings: ControlPlaneSettings, job_id: str, tenant: str, attempt: int,
                 unit: Literal["steps", "trials"] = "steps", clock: Callable[[], float] = time.time):
        self.settings, self.job_id, self.tenant, self.attempt = settings, job_id, tenant, attempt
        self.unit = unit
        self.clock = clock
        self._lost = threading.Event()
        # Set once a write finds the tenant's GPU-hour budget used up: the run stops (leaving a checkpoint, which this
        # sink still records) and the runner ends the attempt with this reason.
        self.budget_spent: str | None = None
        self._last_write = float("-inf")
        self._plane: ControlPlane | None = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "job_id": self.job_id, "tenant": self.tenant, "attempt": self.attempt,
                "unit": self.unit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def plane(self) -> ControlPlane:
        if self._plane is None:
            from cluster.service import ControlPlane

            self._plane = ControlPlane.open(self.settings)
        return self._plane

    def _fenced(self) -> Any:
        from sqlalchemy import update

        from cluster.db import Job, JobState

        return update(Job).where(Job.id == self.job_id, Job.state == JobState.running, Job.attempts == self.attempt)

    def _write(self, values: dict, event: dict | None = None) -> bool:
        """One fenced write; it also charges the attempt's GPU time up to now and checks the tenant's budget."""
        from cluster.db import Job
        from cluster.quotas import budget_spent_reason, charge_attempt
        from cluster.states import add_event

        with self.plane.db.write() as session:
            row = session.execute(self._fenced().values(**values)
                                  .returning(Job.started_at, Job.demand_gpus)).first()
            if row is None:
                self._lost.set()
                return False
            now = values.get("heartbeat_at")
            if now is not None and row.started_at is not None:
                charge_attempt(session, tenant=self.tenant, job_id=self.job_id, attempt=self.attempt, gpus=row.demand_gpus,
                               started_at=row.started_at, until=now)
                reason = budget_spent_reason(session, self.tenant, now)
                if reason is not None:
                    self.budget_spent = reason
            if event is not None:
                add_event(session, job_id=self.job_id, tenant=self.tenant, **event)
            return True

    def heartbeat(self) -> None:
        self._write({"heartbeat_at": self.clock()})

    def on_step(self, info: StepInfo) -> None:
        """A training step. It is the job's progress only where the job counts steps: in a search a trial's
        steps never reach the row (whatever order they arrive in), only `on_trials` does."""
        if self.unit == "steps":
            self._progress(info)

    def on_trials(self, ended: int, total: int, loss: float) -> None:
        """`ended` of a search's `total` trials have ended (finished, stopped early or failed)."""
        if self.unit == "trials":
            self._progress(StepInfo(step=ended, total_steps=total, loss=loss, terms={}, seconds_per_step=0.0, eta_seconds=0.0))

    def _progress(self, info: StepInfo) -> None:
        now = self.clock()
        last = info.step >= info.total_steps
        if not last and now - self._last_write < self.settings.scheduler.progress_write_seconds:
            return
        self._last_write = now
        self._write({"progress_step": info.step, "progress_total": info.total_steps, "progress_loss": float(info.loss),
                     "progress_eta_s": float(info.eta_seconds), "heartbeat_at": now, "updated_at": now,
                     "progress_terms_json": _json({k: float(v) for k, v in dict(info.terms).items()})})

    def on_checkpoint(self, step: int, path: Path) -> None:
        now = self.clock()
        self._write({"checkpoint_step": step, "heartbeat_at": now},
                    {"at": now, "kind": "log", "message": f"checkpoint at step {step}",
                     "data": {"step": step, "attempt": self.attempt}})

    def on_preview(self, step: int, folder: Path) -> None:
        """A training preview (`causalt2i.preview`): published to the store under the job
        (`jobs/<job>/previews/step-NNNNNN`, what `GET /v1/tunings/{id}/previews` lists) and announced as a log
        event, so the job's event stream carries it. A retried attempt renders the same bytes at the same step,
        so an already published step is kept as it is."""
        from causalt2i.preview import PREVIEW_FILE

        if not (Path(folder) / PREVIEW_FILE).is_file():
            return
        try:
            self.plane.store.publish_dir(self.tenant, ("jobs", self.job_id, "previews", Path(folder).name), Path(folder))
        except FileExistsError:
            pass
        now = self.clock()
        self._write({"heartbeat_at": now}, {"at": now, "kind": "log", "message": f"preview at step {step}",
                                            "data": {"step": step, "attempt": self.attempt, "preview": Path(folder).name}})

    def on_diagnostics(self, step: int, diagnostics: dict) -> None:
        """METHOD.md's diagnostics (mask spreads, γ̃ entropies) at a checkpoint, as a log event of the job."""
        values = {k: v for k, v in ((k, _numbers(v)) for k, v in diagnostics.items()) if v is not None}
        now = self.clock()
        self._write({"heartbeat_at": now}, {"at": now, "kind": "log", "message": f"diagnostics at step {step}",
                                            "data": {"step": step, "attempt": self.attempt, "diagnostics": values}})

    def record_resume(self, step: int) -> None:
        """A restarted worker group picked the run up at `step`."""
        now = self.clock()
        self._write({"heartbeat_at": now}, {"at": now, "kind": "log",
                                            "message": f"workers restarted; resumed from the checkpoint at step {step}",
                                            "data": {"resumed_from": step, "attempt": self.attempt}})

    def should_stop(self) -> bool:
        return self._lost.is_set() or self.budget_spent is not None


def _numbers(value):
    """A diagnostic as JSON numbers: a number, a list of numbers (per subject) or a mapping of them (per term);
    anything else (None before α is calibrated) is None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if isinstance(value, dict):
        kept = {str(k): _numbers(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if isinstance(v, float)} or None
    return None


def _json(value) -> str:
    return json.dumps(value)
