"""DeepSpeed in bf16 (the GPU configuration) on the CPU: the adapter is exported from the fp32 masters in the
optimizer, not from the module's bf16 copies. Runs in a child process: DeepSpeed's process group and its
engine state must not outlive the test in the pytest worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import os, socket, tempfile
    from pathlib import Path
    import torch, torch.distributed as dist
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0)); port = free.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from causalt2i.data.synthetic import write_synthetic_spec
    from causalt2i.spec import load_spec
    from causalt2i.trainer import Trainer
    import tune.engine as engine_module

    root = Path(tempfile.mkdtemp())
    spec = load_spec(write_synthetic_spec(root / "s", resolution=64, steps=3, n_subjects=2, images_per_subject=2, size=64))
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"dtype_policy": "bf16", "lr": 1e-3})})

    fp32_trainer = Trainer(spec, root / "fp32", device="cpu")
    assert engine_module.fp32_masters(fp32_trainer, engine_module.attach_deepspeed(fp32_trainer)) is None

    trainer = Trainer(spec, root / "bf16", device="cpu")
    config = engine_module.deepspeed_config
    engine_module.deepspeed_config = lambda **kw: {**config(**kw), "bf16": {"enabled": True}}  # what on_cuda=True asks
    engine = engine_module.attach_deepspeed(trainer)
    assert engine.bfloat16_enabled()
    for _ in range(2):
        trainer.train_step()
    module = trainer.model.named_trainable()
    masters = engine_module.fp32_masters(trainer, engine)
    assert set(masters) == set(module), sorted(set(masters) ^ set(module))
    assert {t.dtype for t in module.values()} == {torch.bfloat16}
    assert {t.dtype for t in masters.values()} == {torch.float32}
    for name, master in masters.items():
        # The module's copy is the master rounded to bf16, bitwise.
        assert torch.equal(master.to(torch.bfloat16), module[name].detach().cpu()), name
    # After two steps at lr 1e-3 the masters carry bits bf16 cannot hold: exporting the copies would lose them.
    lost = sum(int((m != m.to(torch.bfloat16).float()).sum()) for m in masters.values())
    assert lost > 0
    print("masters", len(masters), "bits below bf16 in", lost, "values")
""")


@pytest.mark.timeout(300)
def test_bf16_deepspeed_exports_come_from_the_fp32_masters(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "masters" in done.stdout
