"""pretrain/metrics.py: the metrics log a resumed run continues."""

from __future__ import annotations

import json

from pretrain.metrics import MetricsLogger


def _logger(run_dir, start_step: int) -> MetricsLogger:
    return MetricsLogger(
        run_dir,
        start_step=start_step,
        total_steps=10,
        log_every=1,
        progress=False,
        wandb_setting="disabled",
        project="test",
        config={},
    )


def test_resume_drops_later_steps_and_a_line_half_written_in_a_crash(tmp_path, capsys):
    """A run killed mid-write leaves a truncated last line: the resumed run keeps the
    records up to its checkpoint's step, drops the later ones and the broken line (saying
    so), and appends after them."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = _logger(tmp_path, start_step=3)
    logger.log(dict(step=4, loss=0.5, masked_acc=0.1, grad_norm=1.0, lr=1e-3, tokens_per_s=1.0, mfu=0.1))
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] == 0.5
    assert "dropped 1 unreadable line" in capsys.readouterr().err
