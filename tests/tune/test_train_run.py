"""`tune.train_run`: the switches a job's Ray Train run gets from the platform's settings. That the preemption
watcher's switch reaches Ray Train is shown by the runs themselves: none on a one-node session
(tests/faults/test_ray_train_previews.py), one on the two-node cluster (tests/faults/test_node_loss.py)."""

from __future__ import annotations

import pytest

from cluster.config import ControlPlaneSettings
from tune.train_run import PREEMPTION_WATCHER_ENV, preemption_watcher_env


@pytest.mark.parametrize(("mode", "alive_nodes", "can_add_nodes", "enabled"), [
    ("auto", 1, False, "0"),  # a fixed one-node cluster: a drain takes the controller too
    ("auto", 2, False, "1"),  # a worker may sit on another node
    ("auto", 1, True, "1"),   # an autoscaling cluster whose head is alone at admission
    ("on", 1, False, "1"),
    ("off", 3, True, "0"),
])
def test_the_preemption_watcher_is_kept_wherever_a_worker_can_be_on_another_node(mode, alive_nodes, can_add_nodes, enabled):
    assert preemption_watcher_env(mode, alive_nodes=alive_nodes, can_add_nodes=can_add_nodes) == {PREEMPTION_WATCHER_ENV: enabled}


def test_the_setting_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("CT2I_SCHEDULER__PREEMPTION_WATCHER", "off")
    assert ControlPlaneSettings().scheduler.preemption_watcher == "off"
    monkeypatch.setenv("CT2I_SCHEDULER__PREEMPTION_WATCHER", "sometimes")
    with pytest.raises(ValueError, match="preemption_watcher"):
        ControlPlaneSettings()


def test_the_variable_is_the_one_ray_train_reads():
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR

    assert PREEMPTION_WATCHER_ENV == ENABLE_PREEMPTION_WATCHER_ENV_VAR
