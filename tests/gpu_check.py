"""`make gpu-check`: what a CPU machine cannot run, in one command on a GPU machine.

1. every `gpu`-marked test (`pytest -m gpu`: Transformer Engine layers, the TE document
   mask, bf16, NCCL), each skip listed with its reason;
2. a 20-step bf16 run with the Transformer Engine spec at tp=1 (byte-level stdlib data,
   no download), started from a seed checkpoint, saving a checkpoint at the end: NCCL,
   bf16 and TE layers in use, finite losses that fall;
3. with two GPUs or more: the same 20 steps at tp=2 from the same seed checkpoint, the
   loss of every step within 2% of tp=1's.

Prints one verdict line and exits 0 (PASS) or 1 (FAIL); 2 on a machine without CUDA.
Nothing is skipped silently: a part that cannot run fails the verdict, and the verdict
names anything not run (the 2-GPU part on a one-GPU machine). Budget: < 8 min on one
H100/H200 (imports and process start-up dominate; the model is small).
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dist import QUIET, launch, read_metrics  # noqa: E402

STEPS = 20
RUN = [
    "model=mini",
    "data=stdlib",
    "data.seq_len=128",
    "data.max_bytes=4000000",
    "model.spec=te",
    "train.precision=bf16",
    f"train.steps={STEPS}",
    "train.global_batch_size=32",
    "train.micro_batch_size=16",
    "train.log_every=5",
    "optim.lr=2e-3",
    "optim.warmup_steps=5",
    "checkpoint.every=0",
    "seed=11",
    *QUIET,
]
TP_RTOL = 2e-2


def gpu_tests(workdir: Path) -> tuple[list[str], list[str]]:
    """Run the gpu-marked tests; returns (problems, notes)."""
    report = workdir / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", f"--junitxml={report}", "tests"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    if not report.exists():
        return [f"pytest -m gpu did not run (exit {proc.returncode})"], []
    cases = ElementTree.parse(report).getroot().iter("testcase")
    passed, problems, notes = 0, [], []
    for case in cases:
        name = f"{case.get('classname')}.{case.get('name')}"
        outcome = {child.tag: child.get("message", "") for child in case}
        if "failure" in outcome or "error" in outcome:
            problems.append(f"{name} failed")
        elif "skipped" in outcome:
            reason = outcome["skipped"]
            (notes if "needs 2 GPUs" in reason else problems).append(f"{name} skipped: {reason}")
        else:
            passed += 1
    if passed == 0 and not problems:
        problems.append("no gpu-marked test ran")
    notes.insert(0, f"{passed} gpu tests passed")
    return problems, notes


def training_runs(workdir: Path, gpus: int) -> tuple[list[str], list[str]]:
    """The tp=1 bf16 TE run (and tp=2 with two GPUs) from one seed checkpoint."""
    seed = workdir / "seed"
    launch(1, ["--seed-checkpoint", *RUN, f"run.dir={seed}"], gpu=True)
    init = f"checkpoint.init_from={seed / 'checkpoints' / 'step_0'}"
    tp1 = workdir / "tp1"
    proc = launch(1, [*RUN, init, f"run.dir={tp1}"], gpu=True)
    problems = [f"tp=1 start line lacks {w!r}" for w in ("nccl", "bf16", "layers te") if w not in proc.stdout]
    rows = [r for r in read_metrics(tp1) if "loss" in r]
    losses = [r["loss"] for r in rows]
    if len(rows) != STEPS or not all(math.isfinite(x) for x in losses):
        return [*problems, f"tp=1 run: {len(rows)} steps, losses {losses}"], []
    if losses[-1] >= losses[0]:
        problems.append(f"tp=1 run did not learn: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    tokens_per_s = sum(r["tokens_per_s"] for r in rows[1:]) / (len(rows) - 1)
    notes = [
        f"bf16 TE tp=1 {STEPS} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tokens_per_s:,.0f} tok/s"
    ]
    if gpus < 2:
        return problems, [*notes, "tp=2 run not run (1 GPU)"]
    tp2 = workdir / "tp2"
    launch(2, [*RUN, init, "parallel.tp=2", f"run.dir={tp2}"], gpu=True)
    other = [r["loss"] for r in read_metrics(tp2) if "loss" in r]
    worst = max((abs(a - b) / b for a, b in zip(other, losses, strict=True)), default=math.inf)
    if len(other) != STEPS or worst > TP_RTOL:
        problems.append(f"tp=2 losses differ from tp=1 by up to {worst:.2%} (allowed {TP_RTOL:.0%})")
    return problems, [*notes, f"tp=2 matches tp=1 within {worst:.2%}"]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: cannot run: this machine has no CUDA device (CPU checks: make test)")
        return 2
    start, problems, notes = time.time(), [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in (gpu_tests, lambda w: training_runs(w, torch.cuda.device_count())):
            try:
                found, said = part(Path(tmp))
            except AssertionError as e:  # a launch failed: its output tail is in the message
                print(e, flush=True)
                found, said = [f"a run failed: {str(e).splitlines()[0]}"], []
            problems += found
            notes += said
    verdict = "FAIL" if problems else "PASS"
    detail = "; ".join(problems + notes)
    print(f"gpu-check: {verdict} on {torch.cuda.device_count()}x {torch.cuda.get_device_name()}: {detail} "
          f"[{time.time() - start:.0f} s]")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
