"""Progress of a Ray Train run into its job row, written from the Train controller.

Ray Train calls `UserCallback.after_report` on its controller actor after every report (all ranks). The
callback carries the attempt's `ProgressSink` (it pickles: settings and ids; it reopens the database there),
so every write is fenced by attempt, as in the in-process runner.
"""

from __future__ import annotations

from ray.train import UserCallback

from causalt2i.callbacks import StepInfo
from cluster.progress_sink import ProgressSink

LOSS_TERMS = ("cdm", "attn", "cst", "text")


class JobProgressCallback(UserCallback):
    def __init__(self, sink: ProgressSink):
        self.sink = sink
        self._last_resume = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics:
            return
        head = metrics[0]
        resumed = head.get("resumed_from", -1)
        if resumed is not None and resumed >= 0 and resumed != self._last_resume:
            self._last_resume = resumed
            self.sink.record_resume(resumed)
        self.sink.on_step(StepInfo(step=head["step"], total_steps=head["total_steps"], loss=head["loss"],
                                   terms={k: head[k] for k in LOSS_TERMS if k in head},
                                   seconds_per_step=head.get("seconds_per_step", 0.0), eta_seconds=head.get("eta_seconds", 0.0)))
        if checkpoint is not None:
            self.sink.on_checkpoint(head["step"], checkpoint.path)
            # The workers report the trainer's diagnostics at each checkpoint as `diag_<name>`; the in-process trainer
            # hands the same to its callbacks' `on_diagnostics` when it checkpoints.
            diagnostics = {k.removeprefix("diag_"): v for k, v in head.items() if k.startswith("diag_")}
            if diagnostics:
                self.sink.on_diagnostics(head["step"], diagnostics)
