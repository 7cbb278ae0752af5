"""The processes that only drive a tune import no model code.

The attempt task (`tune.runner`), the `_fit` driver task and the Train controller (`tune.train_run`) each start in a
fresh Ray worker on a new cluster; diffusers, transformers and peft behind `causalt2i.trainer` cost them ~8 s each on
this 2-core machine before the Train worker even starts (BENCHMARKS, "time to first step"). Only the Train workers
import `tune.worker`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "deepspeed", "causalt2i.trainer", "tune.worker")


@pytest.mark.parametrize("module", ["tune.runner", "tune.train_run"])
def test_a_driving_module_imports_no_model_library(module):
    probe = (f"import json, sys; import {module}; "
             f"print(json.dumps([m for m in {list(MODEL_LIBRARIES)!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_probe_sees_a_model_library_when_one_is_imported():
    probe = (f"import json, sys; import causalt2i.trainer; "
             f"print(json.dumps([m for m in {list(MODEL_LIBRARIES)!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert {"diffusers", "transformers", "peft", "causalt2i.trainer"} <= set(json.loads(result.stdout.strip().splitlines()[-1]))
