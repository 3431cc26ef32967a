"""CPU study of lift_ao/code_tuning.py's PV-style code step on the tiny test model (kept at one commit only;
see benchmarks/results/code_step_tiny_cpu.md). Run from /tmp: python /work/main/benchmarks/code_step_study.py"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lift_ao  # noqa: E402
from lift_ao.calibration import calibrate  # noqa: E402
from lift_ao.code_tuning import tune_codes_end_to_end  # noqa: E402
from lift_ao.finetune import held_out_rows  # noqa: E402
from test_finetune import _kl  # noqa: E402
from tiny_models import tiny_llama, token_batch  # noqa: E402

torch.manual_seed(0)
model = tiny_llama()
tokens = token_batch(0, batch=512, length=32)
calibrated = calibrate(copy.deepcopy(model), lift_ao.liftquant(lattice="16/8"), tokens, batch_size=8, finetune_steps=16,
                       progress=False)
e2e = lift_ao.finetune_end_to_end(calibrated, model, tokens, steps=128, lr=1e-2, batch_size=8, progress=False)
print("end-to-end held-out KL", e2e.before, "->", e2e.after)
held = tokens[held_out_rows(512, 0.125)]
other = token_batch(1, batch=16, length=32)
for step in (1.0, 2.0):
    tuned = copy.deepcopy(calibrated)
    result = tune_codes_end_to_end(tuned, model, tokens, rounds=10, step=step, batch_size=8, gradient_batches=56,
                                   progress=False)
    print(f"step {step}: held-out KL {result.before:.4e} -> {result.after:.4e}, blocks changed {result.blocks_changed}")
    for fraction, proposed, kl, kept in result.rounds:
        print(f"    fraction {fraction:.3g}: {proposed} blocks proposed, held-out KL {kl:.4e}, kept {kept}")
    print(f"    KL through the LiftQuant ops: held out {_kl(tuned, model, held):.4e}, "
          f"other text {_kl(calibrated, model, other):.4e} -> {_kl(tuned, model, other):.4e}")
