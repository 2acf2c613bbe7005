"""`dlm report`: plots, data.json and summary from fake run directories.

Expectations are derived from the records each test writes, never restated from the code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from pretrain import cli
from pretrain.report import main, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PANELS = ("loss.png", "nll.png", "lr.png", "curriculum.png", "throughput.png")


def train_record(step: int, tokens_per_step: int, curriculum: dict[str, float]) -> dict:
    return {
        "step": step,
        "loss": 6.0 * math.exp(-step / 15) + 0.05 * (step % 3),
        "masked_acc": 0.01 * step,
        "masked_frac": 0.5,
        "grad_norm": 1.0 / step,
        "lr": 1e-3 * min(1.0, step / 5),
        "weight_decay": 0.1,
        "update_applied": True,
        "tokens": step * tokens_per_step,
        "step_time": 0.1,
        "tokens_per_s": tokens_per_step / (0.1 + 0.001 * step),
        "mfu": 0.001 * (1 + step % 4),
        **{f"curriculum/{k}": v * step for k, v in curriculum.items()},
    }


def eval_record(step: int, nll: float) -> dict:
    return {
        "step": step,
        "eval_loss": nll + 0.2,
        "eval_masked_acc": 0.3,
        "eval_nll": nll,
        "eval_nll_stderr": 0.01 * step,
        "eval_bpb": nll / math.log(2) / 3.5,
    }


def write_run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(lines + tail)
    return run_dir


def run_report(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# run "alpha": 40 steps, evals every 10 (step 20's training record lacks tokens, so the
# eval there is interpolated); run "beta": 30 steps, no evals, a truncated last line.
ALPHA_STEPS, BETA_STEPS = range(1, 41), range(1, 31)
ALPHA_CURRICULUM, BETA_CURRICULUM = {"t_min": 0.001, "t_max": 0.02}, {"block_size": 2.0, "dlm_weight": 0.03}
GARBLED = '{"step": 31, "loss": 2.1, "tok'


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    alpha_train = [train_record(s, 512, ALPHA_CURRICULUM) for s in ALPHA_STEPS]
    del alpha_train[19]["tokens"]  # step 20
    alpha_evals = [eval_record(s, 4.0 - 0.05 * s) for s in (10, 20, 30, 40)]
    alpha = write_run(root / "alpha", sorted(alpha_train + alpha_evals, key=lambda r: r["step"]))
    beta_train = [train_record(s, 1024, BETA_CURRICULUM) for s in BETA_STEPS]
    beta = write_run(root / "beta", beta_train, tail=GARBLED)
    code, stdout, stderr = run_report([str(alpha), str(beta)])
    out = alpha / "report"
    return {
        "code": code,
        "stdout": stdout,
        "stderr": stderr,
        "out": out,
        "data": json.loads((out / "data.json").read_text()),
        "records": {"alpha": (alpha_train, alpha_evals), "beta": (beta_train, [])},
        "beta_metrics": beta / "metrics.jsonl",
    }


def test_writes_a_readable_png_per_panel(report):
    assert report["code"] == 0
    for name in PANELS:
        path = report["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 0 and image.shape[1] > 0, name
    assert sorted(report["data"]) == sorted(PANELS)
    assert not [p for p in report["out"].iterdir() if p.name.endswith(".tmp")]


def tokens_at(train: list[dict], step: int) -> float:
    """The training record's tokens at `step`, else the mean of its neighbours' (unit steps)."""
    by_step = {r["step"]: r.get("tokens") for r in train}
    if by_step[step] is not None:
        return by_step[step]
    return (by_step[step - 1] + by_step[step + 1]) / 2


def points(train: list[dict], key: str) -> dict[str, list[float]]:
    """What data.json should hold for a training metric: (tokens, value) of each record."""
    kept = [r for r in train if key in r]
    return {"x": [tokens_at(train, r["step"]) for r in kept], "y": [r[key] for r in kept]}


def test_train_series_are_the_input_records(report):
    subplots = {name: report["data"][name]["subplots"] for name in PANELS}
    for label, (train, _) in report["records"].items():
        loss = points(train, "loss")
        x, y = loss["x"], loss["y"]
        assert subplots["loss.png"]["loss"][label]["train_loss"] == loss
        smoothed = subplots["loss.png"]["loss"][label]["train_loss_smoothed"]
        assert smoothed["x"] == x and len(smoothed["y"]) == len(y)
        assert min(y) - 1e-9 <= min(smoothed["y"]) and max(smoothed["y"]) <= max(y) + 1e-9
        assert smoothed["y"][0] == pytest.approx(y[0]) and smoothed["y"][-1] == pytest.approx(y[-1])
        assert smoothed["y"] != pytest.approx(y)  # it does smooth
        assert subplots["lr.png"]["lr"][label]["lr"] == points(train, "lr")
        for key in ("tokens_per_s", "mfu"):
            series = subplots["throughput.png"][key][label][key]
            assert series == points(train, key)


def test_eval_series_are_placed_at_the_tokens_of_their_step(report):
    subplots = report["data"]["nll.png"]["subplots"]
    train, evals = report["records"]["alpha"]
    x = [tokens_at(train, e["step"]) for e in evals]
    assert subplots["eval_nll"]["alpha"]["eval_nll"] == {
        "x": x,
        "y": [e["eval_nll"] for e in evals],
        "yerr": [e["eval_nll_stderr"] for e in evals],
    }
    assert subplots["eval_bpb"]["alpha"]["eval_bpb"] == {"x": x, "y": [e["eval_bpb"] for e in evals]}
    eval_loss = report["data"]["loss.png"]["subplots"]["loss"]["alpha"]["eval_loss"]
    assert eval_loss == {"x": x, "y": [e["eval_loss"] for e in evals]}
    # beta has no eval records: it is on no eval subplot, and has no eval_loss series
    assert all("beta" not in per_run for per_run in subplots.values())
    assert "eval_loss" not in report["data"]["loss.png"]["subplots"]["loss"]["beta"]


def test_curriculum_panel_has_the_union_of_keys(report):
    subplots = report["data"]["curriculum.png"]["subplots"]
    curricula = {"alpha": ALPHA_CURRICULUM, "beta": BETA_CURRICULUM}
    assert set(subplots) == {f"curriculum/{k}" for c in curricula.values() for k in c}
    for label, curriculum in curricula.items():
        train = report["records"][label][0]
        for name in curriculum:
            key = f"curriculum/{name}"
            assert list(subplots[key]) == [label]
            assert subplots[key][label][key] == points(train, key)


def test_garbled_last_line_is_reported_and_skipped(report):
    line_number = len(BETA_STEPS) + 1
    where = f"{report['beta_metrics']}:{line_number}"
    assert where in report["stderr"]
    assert where in (report["out"] / "summary.txt").read_text()
    beta_loss = report["data"]["loss.png"]["subplots"]["loss"]["beta"]["train_loss"]
    assert len(beta_loss["x"]) == len(BETA_STEPS)


def test_summary_gives_per_run_figures(report):
    summary = (report["out"] / "summary.txt").read_text()
    assert report["stdout"] == summary
    for label, (train, _) in report["records"].items():
        section = summary.split(f"{label}  (")[1]
        losses = [r["loss"] for r in train]
        tail = losses[-math.ceil(len(losses) / 10) :]
        assert f"final train loss: {sum(tail) / len(tail):.4f}" in section
        assert f"tokens seen: {max(r.get('tokens', 0) for r in train):,}" in section
        assert f"steps: {train[-1]['step']}" in section
        mfu = sum(r["mfu"] for r in train) / len(train)
        assert f"mean MFU: {100 * mfu:.2f}%" in section
    _, evals = report["records"]["alpha"]
    best = min(e["eval_loss"] for e in evals)
    assert f"eval_loss: best {best:.4f}" in summary
    last = evals[-1]
    assert f"final eval_nll: {last['eval_nll']:.4f} ± {last['eval_nll_stderr']:.4f}" in summary
    assert "best on final eval_nll: alpha" in summary


def test_summary_names_the_run_with_the_lower_final_eval_nll(tmp_path):
    final_nll = {"first": 3.2, "second": 2.9, "third": 3.0}
    dirs = []
    for label, nll in final_nll.items():
        train = [train_record(s, 256, {}) for s in range(1, 11)]
        dirs.append(str(write_run(tmp_path / label, train + [eval_record(5, 4.0), eval_record(10, nll)])))
    code, stdout, _ = run_report([*dirs, "--out", str(tmp_path / "out")])
    assert code == 0
    best = min(final_nll, key=final_nll.get)
    assert f"best on final eval_nll: {best} ({final_nll[best]:.4f}" in stdout
    assert "skipped curriculum.png" in stdout and not (tmp_path / "out" / "curriculum.png").exists()


def test_missing_metrics_is_exit_2_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_report([str(tmp_path / "empty")])
    assert code == 2
    assert str(tmp_path / "empty" / "metrics.jsonl") in stderr


def test_runs_with_the_same_name_are_told_apart_by_their_parent(tmp_path):
    dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert run_labels(dirs) == ["a/run", "b/run", "c"]


def test_cli_dispatches_report(capsys):
    assert cli.main(["report", "--help"]) == 0
    assert "RUN_DIR" in capsys.readouterr().out
    assert "report" in cli.usage()
