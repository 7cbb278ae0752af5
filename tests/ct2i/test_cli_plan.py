"""`ct2i plan`: every (mode, policy, checkpointing) plan of a spec, exit 2 when the spec's own does not fit."""

from __future__ import annotations

import yaml

from ct2i.cli import main
from tests.cluster.conftest import spec_dict


def _spec_file(tmp_path, **resources) -> str:
    data = spec_dict("acme", images=("cat.png",))  # the plan does not read images: the file need not exist
    data["resources"].update(resources)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_ct2i_plan_prints_every_combination_and_exits_by_whether_the_spec_fits(tmp_path, capsys):
    assert main(["plan", _spec_file(tmp_path, gpus_per_worker=1), "--gpu-memory-gb", "80"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "measuring 8/8: lora, fp32, checkpointing" in captured.err  # progress on stderr
    rows = [line for line in out.splitlines() if line.lstrip("* ").startswith(("full,", "lora,"))]
    assert len(rows) == 8 and sum(line.startswith("* ") for line in rows) == 1
    assert "U-Net" in out and "adapter" in out and "this spec fits" in out
    assert main(["plan", _spec_file(tmp_path, gpus_per_worker=0.25), "--gpu-memory-gb", "1"]) == 2
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out
    errors = [line for line in captured.err.splitlines() if not line.startswith("measuring ")]
    assert len(errors) == 1 and errors[0].startswith("ct2i: error: resources.gpus_per_worker:")
