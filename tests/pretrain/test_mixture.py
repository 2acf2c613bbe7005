"""`dlm mixture show` on two datasets (a small and a large one): the table of what each
contributes to the run, the max_epochs refusal (also by the trainer's preflight), and a
recipe preset named positionally."""

from __future__ import annotations

import pytest

from parallel.topology import ConfigError
from pretrain import cli
from pretrain.config import load_config
from tests.data.test_loader import SEQ, make_dataset


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mixture")
    small = make_dataset(root / "small", [20, 20])  # 40 samples
    big = make_dataset(root / "big", [60] * 10)  # 600 samples
    return f"{{path:{small},name:small,tokens:TOKENS,max_epochs:CAP}},{{path:{big},name:big}}"


def settings(sources: str, tokens: int, cap: float) -> list[str]:
    return [
        "data.source=shards",
        f"data.sources=[{sources.replace('TOKENS', str(tokens)).replace('CAP', str(cap))}]",
        f"data.seq_len={SEQ}",
        "data.num_workers=0",
        "train.steps=50",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
    ]


def test_show_prints_each_sources_share_and_what_runs_out_first(sources, capsys):
    # 50 steps x 8 samples x 16 tokens = 6,400 tokens; small's budget 1,600 = 100 samples = 2.5 epochs
    assert cli.main(["mixture", "show", *settings(sources, 1600, 3)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "50 steps x 8 samples of 16 tokens = 6,400 tokens" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert rows["small"] == ["0.2500", "1,600", "40", "2.500", "3"]
    assert rows["big"] == ["0.7500", "4,800", "600", "0.500", "-"]
    assert "runs out first: small (its first epoch ends at step ~20 of 50)" in out


def test_a_source_over_its_max_epochs_is_refused_by_show_and_by_the_trainer(sources, capsys):
    over = settings(sources, 1600, 2)
    assert cli.main(["mixture", "show", *over]) == 1
    err = capsys.readouterr().err
    assert "small: the run would go through it 2.50 times, more than its max_epochs=2" in err
    from pretrain.train import preflight

    with pytest.raises(ConfigError, match="small: the run would go through it 2.50 times"):
        preflight(load_config(over), world_size=1)
    assert cli.main(["mixture", "show", *settings(sources, 9000, 3)]) == 2  # over the run's 6,400
    assert "more than the run's 6,400" in capsys.readouterr().err


def test_a_recipe_preset_is_named_positionally(capsys):
    assert cli.main(["mixture", "show", "web_code_math"]) == 2  # a template: its paths do not exist here
    assert "/data/fineweb-edu" in capsys.readouterr().err
    assert cli.main(["mixture", "show", "no_such_recipe"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_run_reads_the_small_source_as_often_as_show_predicts(sources, capsys, tmp_path):
    """2 data-parallel ranks, 50 steps: the trainer's per-source tokens add up to the run's,
    and the small source's epochs are show's prediction within the draws' noise (3 sd)."""
    from tests.dist import QUIET, launch, read_metrics

    run = [*settings(sources, 1600, 3), "model=tiny", "train.global_batch_size=8", "train.micro_batch_size=4"]
    assert cli.main(["mixture", "show", *run, "cluster.tasks_per_node=2"]) == 0
    predicted = float(
        next(li for li in capsys.readouterr().out.splitlines() if li.startswith("small")).split()[4]
    )
    launch(2, [*run, "train.log_every=10", "checkpoint.every=0", *QUIET, f"run.dir={tmp_path / 'run'}"])
    last = [row for row in read_metrics(tmp_path / "run") if "loss" in row][-1]
    assert last["step"] == 50
    assert last["data/tokens/small"] + last["data/tokens/big"] == 50 * 8 * SEQ
    sd = (400 * 0.25 * 0.75) ** 0.5 / 40  # binomial sd of the small source's 400 draws, in epochs
    assert predicted == 2.5 and abs(last["data/epochs/small"] - predicted) < 3 * sd, last
