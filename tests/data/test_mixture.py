"""data/mixture.py: token budgets and weights -> sampling fractions, the max_epochs check,
and the table `dlm mixture show` prints (figures worked out by hand)."""

from __future__ import annotations

import pytest

from data.mixture import MixtureError, Spec, check, fractions, plan, table


def test_budgets_first_then_the_rest_by_weight():
    specs = [Spec("a", tokens=250), Spec("b", weight=1.0), Spec("c", weight=3.0)]
    assert fractions(specs, 1000) == pytest.approx([0.25, 0.1875, 0.5625])
    assert fractions([Spec("a", weight=2.0), Spec("b", weight=6.0)], 1000) == pytest.approx([0.25, 0.75])
    assert fractions([Spec("a", tokens=400), Spec("b", tokens=600)], 1000) == pytest.approx([0.4, 0.6])


def test_budgets_that_do_not_fit_the_run_are_refused():
    with pytest.raises(MixtureError, match="add up to 1,200 tokens, more than the run's 1,000"):
        fractions([Spec("a", tokens=700), Spec("b", tokens=500)], 1000)
    with pytest.raises(MixtureError, match="no source with a weight takes the rest"):
        fractions([Spec("a", tokens=300), Spec("b", tokens=500)], 1000)


def test_max_epochs_refuses_a_run_that_repeats_a_source_too_often():
    # 1000 samples of 10 tokens; small: budget 3000 tokens = 300 samples over 100 per epoch = 3 epochs
    specs = [Spec("/d/small", tokens=3000, max_epochs=2), Spec("/d/big", weight=1.0, max_epochs=1)]
    shares = plan(specs, [100, 5000], run_samples=1000, seq_len=10)
    assert [s.epochs for s in shares] == pytest.approx([3.0, 0.14])
    with pytest.raises(
        MixtureError, match=r"small: the run would go through it 3.00 times, more than its max_epochs=2"
    ):
        check(shares)
    check(plan([Spec("/d/small", tokens=2000, max_epochs=2), Spec("/d/big")], [100, 5000], 1000, 10))


def test_table_names_the_source_that_runs_out_first_and_when():
    specs = [Spec("/d/big", name="web"), Spec("/d/small", name="math", tokens=3000)]
    shares = plan(specs, [5000, 100], run_samples=1000, seq_len=10)  # 10 samples per step, 100 steps
    text = table(shares, seq_len=10, samples_per_step=10)
    # math: 30% of the samples, its 100-sample epoch ends at sample 333: step ~33
    assert "runs out first: math (its first epoch ends at step ~33 of 100)" in text
    assert text.splitlines()[2].split()[:5] == ["math", "0.3000", "3,000", "100", "3.000"]
    later = table(plan([Spec("/d/big")], [5000], 1000, 10), seq_len=10, samples_per_step=10)
    assert "no source runs out during the run (big would first, at step ~500)" in later
