"""Step metrics: `<run.dir>/metrics.jsonl`, a console progress bar, and wandb.

Only global rank 0 writes. wandb runs offline unless an API key is configured
(`logging.wandb=auto`), so nothing leaves the machine by default; `wandb sync
<run.dir>/wandb/offline-run-*` uploads later.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm


def measure_peak_flops(seconds: float = 0.5, n: int = 1024, repeats: int = 5) -> float:
    """Dense fp32 matmul FLOP/s this process reaches on the CPU (the MFU baseline): the
    best of `repeats` timings, since a shared machine only ever slows a timing down."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


# Dense bf16 datasheet peaks per GPU (no sparsity), TFLOP/s.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def peak_flops_per_device(configured_tflops: float | None) -> tuple[float, str]:
    if configured_tflops:
        return configured_tflops * 1e12, "cluster.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"datasheet bf16 peak of {name}"
        raise ValueError(f"unknown GPU {name!r}: set cluster.peak_tflops for MFU")
    return measure_peak_flops(), "measured fp32 matmul on this CPU"


def wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    return "online" if has_key else "offline"


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        start_step: int,
        total_steps: int,
        log_every: int,
        progress: bool,
        wandb_setting: str,
        project: str,
        config: dict,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        self.log_every = max(1, log_every)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=None if progress else True,  # None: only on a terminal
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.wandb = self._init_wandb(Path(run_dir), wandb_setting, project, config)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone), and
        lines that are not JSON records (a line half-written when the run was killed),
        saying how many."""
        if not self.path.exists():
            return
        records = [(line, _record(line)) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line, record in records if record is not None and record.get("step", 0) <= step]
        broken = sum(record is None for _, record in records)
        if broken:
            print(f"{self.path}: dropped {broken} unreadable line(s) (a crash mid-write)", file=sys.stderr)
        self.path.write_text("".join(line + "\n" for line in keep))

    @staticmethod
    def _init_wandb(run_dir: Path, setting: str, project: str, config: dict):
        mode = wandb_mode(setting)
        if mode == "disabled":
            return None
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if "loss" in record:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if record["step"] % self.log_every == 0 or record["step"] == self.bar.total:
                self.write(format_record(record))
        else:
            self.write(format_record(record))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Texts generated at an evaluation: one metrics.jsonl record {step, samples:
        [{prompt, completion}]}, console lines, and a wandb table."""
        self.file.write(json.dumps({"step": step, "samples": samples}) + "\n")
        self.file.flush()
        for number, sample in enumerate(samples, 1):
            self.write(f"  sample {number}: {sample['prompt']!r} -> {sample['completion']!r}")
        if self.wandb is not None:
            import wandb

            rows = [[step, s["prompt"], s["completion"]] for s in samples]
            table = wandb.Table(columns=["step", "prompt", "completion"], data=rows)
            self.wandb.log({"samples": table}, step=step)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _record(line: str) -> dict | None:
    """A metrics.jsonl line as a record, or None if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def format_record(r: dict) -> str:
    if "loss" not in r:
        return "  ".join(f"{k}={_fmt(v)}" for k, v in r.items())
    return (
        f"step {r['step']:>6}  loss {r['loss']:.4f}  acc {r['masked_acc']:.3f}  "
        f"grad_norm {r['grad_norm']:.3f}  lr {r['lr']:.2e}  {r['tokens_per_s']:.0f} tok/s  "
        f"MFU {100 * r['mfu']:.2f}%"
    )


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
