"""`dlm report RUN_DIR [RUN_DIR ...] [--out DIR]`: plots that compare training runs.

Reads each run's `metrics.jsonl` (training records carry `loss`; eval records carry
`eval_*` keys and no `loss`) and writes to `--out` (default: `<first run>/report/`):

- one PNG per panel, every run on each figure, tokens seen on the x axis: loss.png,
  nll.png, lr.png, curriculum.png, throughput.png. A panel no run has data for is skipped
  (and the summary says so);
- data.json: for each PNG, the exact series plotted, per run (tests check data, not pixels);
- summary.txt, also printed: per-run figures and, for several runs, the best one.

Eval records carry no token count: an eval step's x is the tokens of the training record
of the same step, else interpolated between the nearest training records. Unparsable
lines (a crash mid-write) are skipped with a warning naming file and line.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from data.files import write_atomic  # noqa: E402

CURRICULUM_PREFIX = "curriculum/"
EVAL_PREFIX = "eval_"
FINAL_LOSS_FRACTION = 0.1  # "final train loss": mean over the last 10% of logged steps
SMOOTHING = 0.025  # the smoothed loss averages 2.5% of a run's steps on either side
LOG_X, LINEAR_X = "log", "linear"
Y_LABELS = {
    "loss": "loss",
    "eval_nll": "NLL upper bound (nats/token)",
    "eval_bpb": "bits per byte",
    "lr": "learning rate",
    "tokens_per_s": "tokens/s",
    "mfu": "MFU",
}
# config.yaml keys shown next to a run's label in the summary
CONFIG_FACTS = (
    ("model", "model.name"),
    ("data", "data.name"),
    ("seq_len", "data.seq_len"),
    ("batch", "train.global_batch_size"),
    ("weighting", "objective.weighting"),
    ("normalization", "objective.normalization"),
)


class ReportError(Exception):
    """A run directory that cannot be reported on (exit status 2)."""


# -- reading runs --------------------------------------------------------------------------
@dataclass
class TokenAxis:
    """Tokens seen at each logged training step, to place any step on the x axis."""

    steps: list[float]
    tokens: list[float]

    def at(self, step: float) -> float | None:
        if not self.steps:
            return None
        i = bisect_left(self.steps, step)
        if i < len(self.steps) and self.steps[i] == step:
            return self.tokens[i]
        if 0 < i < len(self.steps):
            s0, s1, t0, t1 = self.steps[i - 1], self.steps[i], self.tokens[i - 1], self.tokens[i]
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        # outside the logged range: a fixed number of tokens per step
        nearest = 0 if i == 0 else -1
        s, t = self.steps[nearest], self.tokens[nearest]
        return t * step / s if s > 0 else None


@dataclass
class Run:
    label: str
    path: Path
    train: list[dict]  # records with "loss", one per step, by step
    evals: list[dict]  # records with eval_* keys and no "loss", one per step, by step
    description: str = ""  # from config.yaml
    warnings: list[str] = field(default_factory=list)
    axis: TokenAxis = field(init=False)

    def __post_init__(self):
        known = [(r["step"], r["tokens"]) for r in self.train if is_number(r.get("tokens"))]
        self.axis = TokenAxis([s for s, _ in known], [float(t) for _, t in known])


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_record(line: str) -> tuple[dict | None, str]:
    """A metrics line as a record, or None and why it cannot be one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "not valid JSON (truncated?)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not is_number(record.get("step")):
        return None, "a record without a step"
    return record, ""


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    records, warnings = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record, problem = parse_record(line)
            if record is None:
                warnings.append(f"{path}:{number}: skipped a line that is {problem}: {line.strip()[:60]!r}")
            else:
                records.append(record)
    return records, warnings


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step (the last one logged, as after a resume), ordered by step."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def is_eval_record(record: dict) -> bool:
    return "loss" not in record and any(k.startswith(EVAL_PREFIX) for k in record)


def describe_config(run_dir: Path) -> tuple[str, list[str]]:
    """A few config.yaml facts ("model tiny, data stdlib, ..."), and any warning."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return "", []
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return "", [f"{path}: unreadable, ignored ({type(e).__name__})"]
    facts = [(name, dotted_get(cfg, key)) for name, key in CONFIG_FACTS]
    return ", ".join(f"{name} {value}" for name, value in facts if value is not None), []


def dotted_get(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def load_run(run_dir: Path, label: str) -> Run:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is {run_dir} a run directory?)")
    records, warnings = read_records(path)
    description, config_warnings = describe_config(run_dir)
    train = last_per_step([r for r in records if "loss" in r])
    evals = last_per_step([r for r in records if is_eval_record(r)])
    run = Run(label, run_dir, train, evals, description, warnings + config_warnings)
    run.warnings += unplottable(run, path)
    return run


def unplottable(run: Run, path: Path) -> list[str]:
    if not run.train and not run.evals:
        return [f"{path}: no training or eval records"]
    if not run.axis.steps:
        return [f"{path}: no training record has tokens, so nothing can be placed on the x axis"]
    return []


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names; names shared by several runs get their parent directory too."""
    paths = [p.resolve() for p in run_dirs]
    names = [p.name or str(p) for p in paths]
    labels = [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


# -- series and panels ---------------------------------------------------------------------
@dataclass
class Series:
    x: list[float]
    y: list[float]
    yerr: list[float] | None = None
    style: str = "line"  # line | raw (faint, unlabelled) | markers | joined (markers on a line)

    def to_json(self) -> dict:
        data = {"x": self.x, "y": self.y}
        return data | ({"yerr": self.yerr} if self.yerr is not None else {})


SeriesMaker = Callable[[Run], Series | None]
RunSeries = dict[str, dict[str, Series]]  # run label -> series name -> Series


def metric_series(run: Run, records: list[dict], key: str, err_key: str | None = None) -> Series | None:
    """(tokens, value) of the records holding `key`; records whose step has no token
    position are left out. With `err_key`, its value (0 where missing) as error bars."""
    x, y, err = [], [], []
    for record in records:
        tokens = run.axis.at(record["step"])
        if is_number(record.get(key)) and tokens is not None:
            x.append(tokens)
            y.append(float(record[key]))
            err.append(float(record[err_key]) if is_number(record.get(err_key)) else 0.0)
    if not x:
        return None
    return Series(x, y, err if err_key else None)


def train_series(key: str) -> SeriesMaker:
    return lambda run: metric_series(run, run.train, key)


def eval_series(key: str, err_key: str | None = None, style: str = "line") -> SeriesMaker:
    def make(run: Run) -> Series | None:
        series = metric_series(run, run.evals, key, err_key)
        return series and replace(series, style=style)

    return make


def centered_mean(values: list[float], half_width: int) -> list[float]:
    """Mean of each value and its `half_width` neighbours on both sides, as many on each
    side near the ends: unlike a trailing average or EMA it neither lags the raw curve nor,
    at the ends, leans towards one side of it."""
    prefix = [0.0, *accumulate(values)]
    widths = [min(half_width, i, len(values) - 1 - i) for i in range(len(values))]
    return [(prefix[i + w + 1] - prefix[i - w]) / (2 * w + 1) for i, w in enumerate(widths)]


def raw_train_loss(run: Run) -> Series | None:
    series = metric_series(run, run.train, "loss")
    return series and replace(series, style="raw")


def smoothed_train_loss(run: Run) -> Series | None:
    series = metric_series(run, run.train, "loss")
    return series and Series(series.x, centered_mean(series.y, round(len(series.y) * SMOOTHING)))


def collect(runs: list[Run], makers: dict[str, SeriesMaker]) -> RunSeries:
    """For each run with any of them, the named series it has."""
    per_run = {}
    for run in runs:
        made = {name: make(run) for name, make in makers.items()}
        if found := {name: series for name, series in made.items() if series is not None}:
            per_run[run.label] = found
    return per_run


@dataclass
class Panel:
    filename: str
    xscale: str
    wanted: str  # what it plots, for the summary when no run has it
    subplots: dict[str, RunSeries]  # subplot (a metric key) -> its series; empty ones dropped

    def __post_init__(self):
        self.subplots = {key: per_run for key, per_run in self.subplots.items() if per_run}

    def to_json(self) -> dict:
        subplots = {
            key: {label: {name: s.to_json() for name, s in named.items()} for label, named in per_run.items()}
            for key, per_run in self.subplots.items()
        }
        return {"x_label": x_label(self.xscale), "x_scale": self.xscale, "subplots": subplots}


def x_label(xscale: str) -> str:
    return "tokens seen" + (" (log scale)" if xscale == LOG_X else "")


def loss_panel(runs: list[Run]) -> Panel:
    makers = {
        "train_loss": raw_train_loss,
        "train_loss_smoothed": smoothed_train_loss,
        "eval_loss": eval_series("eval_loss", style="markers"),
    }
    return Panel("loss.png", LOG_X, "loss or eval_loss", {"loss": collect(runs, makers)})


def nll_panel(runs: list[Run]) -> Panel:
    subplots = {
        "eval_nll": collect(runs, {"eval_nll": eval_series("eval_nll", "eval_nll_stderr", "joined")}),
        "eval_bpb": collect(runs, {"eval_bpb": eval_series("eval_bpb", style="joined")}),
    }
    return Panel("nll.png", LOG_X, "eval_nll or eval_bpb", subplots)


def lr_panel(runs: list[Run]) -> Panel:
    return Panel("lr.png", LINEAR_X, "lr", {"lr": collect(runs, {"lr": train_series("lr")})})


def curriculum_keys(runs: list[Run]) -> list[str]:
    """Every curriculum/* key any run logs: the union, as runs may schedule different ones."""
    return sorted({k for run in runs for r in run.train for k in r if k.startswith(CURRICULUM_PREFIX)})


def curriculum_panel(runs: list[Run]) -> Panel:
    subplots = {key: collect(runs, {key: train_series(key)}) for key in curriculum_keys(runs)}
    return Panel("curriculum.png", LINEAR_X, f"{CURRICULUM_PREFIX}* metrics", subplots)


def throughput_panel(runs: list[Run]) -> Panel:
    subplots = {key: collect(runs, {key: train_series(key)}) for key in ("tokens_per_s", "mfu")}
    return Panel("throughput.png", LINEAR_X, "tokens_per_s or mfu", subplots)


def build_panels(runs: list[Run]) -> list[Panel]:
    return [build(runs) for build in (loss_panel, nll_panel, lr_panel, curriculum_panel, throughput_panel)]


# -- drawing and writing -------------------------------------------------------------------
def draw_series(ax, series: Series, label: str, color: str) -> None:
    if series.style == "raw":
        ax.plot(series.x, series.y, color=color, alpha=0.25, linewidth=0.8)
    elif series.style in ("markers", "joined"):
        fmt = "o-" if series.style == "joined" else "o"
        ax.errorbar(series.x, series.y, series.yerr, fmt=fmt, color=color, ms=4, capsize=3, label=label)
    else:
        ax.plot(series.x, series.y, color=color, label=label)


def series_label(run_label: str, name: str, key: str) -> str:
    """The run's name for the main series of a subplot; run and series otherwise."""
    return run_label if name == key else f"{run_label} {name}"


def draw_panel(panel: Panel, colors: dict[str, str]) -> Figure:
    rows = len(panel.subplots)
    fig = Figure(figsize=(8, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax, (key, per_run) in zip(axes, panel.subplots.items(), strict=True):
        for label, named in per_run.items():
            for name, series in named.items():
                draw_series(ax, series, series_label(label, name, key), colors[label])
        ax.set(xscale=panel.xscale, xlabel=x_label(panel.xscale), ylabel=Y_LABELS.get(key, key), title=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def write_text(path: Path, text: str) -> None:
    write_atomic(path, text)


def write_panels(panels: list[Panel], runs: list[Run], out: Path) -> None:
    """One PNG per panel with data; a skipped panel's PNG from an earlier report is removed."""
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for panel in panels:
        if not panel.subplots:
            (out / panel.filename).unlink(missing_ok=True)
            continue
        fig = draw_panel(panel, colors)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        write_atomic(out / panel.filename, png.getvalue())


# -- summary -------------------------------------------------------------------------------
def values(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if is_number(r.get(key))]


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def final_train_loss(run: Run) -> tuple[float, int, int] | None:
    """Mean loss over the last 10% of logged steps, that count, and the total."""
    losses = values(run.train, "loss")
    if not losses:
        return None
    tail = max(1, math.ceil(len(losses) * FINAL_LOSS_FRACTION))
    return mean(losses[-tail:]), tail, len(losses)


def final_eval(run: Run, key: str) -> dict | None:
    return next((r for r in reversed(run.evals) if is_number(r.get(key))), None)


def best_eval(run: Run, key: str) -> dict | None:
    return min((r for r in run.evals if is_number(r.get(key))), key=lambda r: r[key], default=None)


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def eval_loss_fact(run: Run) -> str:
    best, final = best_eval(run, "eval_loss"), final_eval(run, "eval_loss")
    if final is None:
        return "n/a"
    return f"best {at_step(best, 'eval_loss')}, final {at_step(final, 'eval_loss')}"


def at_step(record: dict, key: str) -> str:
    return f"{record[key]:.4f} (step {record['step']})"


def eval_nll_fact(run: Run) -> str:
    final = final_eval(run, "eval_nll")
    if final is None:
        return "n/a"
    stderr = f" ± {final['eval_nll_stderr']:.4f}" if is_number(final.get("eval_nll_stderr")) else ""
    bpb = f", {final['eval_bpb']:.4f} bits/byte" if is_number(final.get("eval_bpb")) else ""
    return f"{final['eval_nll']:.4f}{stderr} nats/token{bpb} (step {final['step']})"


def train_loss_fact(run: Run) -> str:
    final = final_train_loss(run)
    if final is None:
        return "n/a"
    loss, tail, total = final
    return f"{loss:.4f} (mean of the last {tail} of {total} finite losses)"


def nonfinite_loss_fact(run: Run) -> str | None:
    bad = [r["step"] for r in run.train if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])]
    return f"at {len(bad)} of {len(run.train)} steps, the first {bad[0]}" if bad else None


def run_facts(run: Run) -> list[tuple[str, str | None]]:
    last_step = max(values(run.train, "step"), default=None)
    records = f"{len(run.train)} training, {len(run.evals)} eval records"
    mfu = mean(values(run.train, "mfu"))
    return [
        ("steps", f"{fmt(last_step, '.0f')} ({records})"),
        ("tokens seen", fmt(max(values(run.train, "tokens"), default=None), ",.0f")),
        ("final train loss", train_loss_fact(run)),
        ("non-finite train loss", nonfinite_loss_fact(run)),
        ("eval_loss", eval_loss_fact(run)),
        ("final eval_nll", eval_nll_fact(run)),
        ("mean tokens/s", fmt(mean(values(run.train, "tokens_per_s")), ",.0f")),
        ("mean MFU", "n/a" if mfu is None else f"{100 * mfu:.2f}%"),
    ]


def run_summary(run: Run) -> list[str]:
    head = f"{run.label}  ({run.path})" + (f"\n  config: {run.description}" if run.description else "")
    return [head] + [f"  {name}: {value}" for name, value in run_facts(run) if value is not None]


def comparison_metric(runs: list[Run]) -> str | None:
    """eval_nll when any run has it (comparable across objectives), else eval_loss."""
    for key in ("eval_nll", "eval_loss"):
        if any(final_eval(run, key) for run in runs):
            return key
    return None


def stderr_of(record: dict) -> float | None:
    return record.get("eval_nll_stderr") if is_number(record.get("eval_nll_stderr")) else None


def best_run_line(runs: list[Run]) -> str:
    key = comparison_metric(runs)
    if key is None:
        return "best run: cannot tell, no run has eval_nll or eval_loss"
    finals = [(final_eval(run, key), run.label) for run in runs]
    finals = sorted((f for f in finals if f[0] is not None), key=lambda f: f[0][key])
    (best, label), others = finals[0], finals[1:]
    if not others:
        return f"best on final {key}: {label} ({best[key]:.4f}; the only run with {key})"
    (second, second_label) = others[0]
    line = f"best on final {key}: {label} ({best[key]:.4f}; next {second_label} {second[key]:.4f})"
    if stderr_of(best) is not None and stderr_of(second) is not None:
        line += significance(second[key] - best[key], math.hypot(stderr_of(best), stderr_of(second)))
    return line


def significance(gap: float, stderr: float) -> str:
    """How many standard errors of the difference apart the two best runs are."""
    if stderr <= 0:
        return ""
    z = gap / stderr
    return f"; the gap is {z:.2f} standard errors" + (" (within noise)" if z < 2 else "")


def format_summary(runs: list[Run], panels: list[Panel], out: Path) -> str:
    lines = [line for run in runs for line in run_summary(run)]
    if len(runs) > 1:
        lines.append(best_run_line(runs))
    lines += [f"plotted {p.filename}: {', '.join(p.subplots)}" for p in panels if p.subplots]
    lines += [f"skipped {p.filename}: no run has {p.wanted}" for p in panels if not p.subplots]
    warnings = [w for run in runs for w in run.warnings]
    lines += (["warnings:"] + [f"  {w}" for w in warnings]) if warnings else []
    lines.append(f"wrote {out}/")
    return "\n".join(lines) + "\n"


# -- command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlm report",
        description="PNG plots comparing training runs (loss, NLL, LR, curriculum, throughput), "
        "data.json with the plotted series, and a text summary.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="holds metrics.jsonl")
    parser.add_argument("--out", type=Path, help="output directory [first RUN_DIR/report]")
    return parser


def report(run_dirs: list[Path], out: Path) -> str:
    """Write the report of these runs to `out`; return the summary."""
    runs = [load_run(d, label) for d, label in zip(run_dirs, run_labels(run_dirs), strict=True)]
    for warning in (w for run in runs for w in run.warnings):
        print(f"dlm report: warning: {warning}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    panels = build_panels(runs)
    write_panels(panels, runs, out)
    data = {p.filename: p.to_json() for p in panels if p.subplots}
    write_text(out / "data.json", json.dumps(data, indent=1) + "\n")
    summary = format_summary(runs, panels, out)
    write_text(out / "summary.txt", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return int(e.code or 0)
    try:
        summary = report(args.run_dirs, args.out or args.run_dirs[0] / "report")
    except ReportError as e:
        print(f"dlm report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dlm report: error: {e}", file=sys.stderr)
        return 1
    print(summary, end="")
    return 0


if __name__ == "__main__":  # python -m pretrain.report: the `dlm report` application
    from pretrain.cli import main as dlm

    sys.exit(dlm(["report", *sys.argv[1:]]))
