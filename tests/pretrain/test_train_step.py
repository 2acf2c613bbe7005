"""The trainer's step without process groups: forward_step / loss_fn / the metric
reduction on a device that is not the CPU, and which ranks read data.

A GPU is not available here, so the step's own code runs on tests/simulated_device.py's
device: a tensor created without `device=` lands on the CPU and mixing it with the
model's tensors raises there, as on a GPU. The megatron model and engine are replaced by
stand-ins with the same output contract (they are exercised by the multi-process tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parallel.topology import Topology
from pretrain.config import derive, load_config
from pretrain.train import Run, forward_step, microbatches, stage_data_keys, step_plan, sum_reports
from tests.simulated_device import DEVICE, OnDevice, simulated_device, values

VOCAB, SEQ, MBS = 40, 16, 4


class StandInDenoiser:
    """The Denoiser's output contract: [s, b, V] logits, or [n, 1, V] at logit_positions."""

    def __init__(self, device):
        table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
        self.table = table.to(device).requires_grad_()

    def __call__(
        self,
        input_ids,
        logit_positions=None,
        segments=None,
        attention_mask=None,
        input_noise=None,
        rope_positions=None,
    ):
        logits = self.table[input_ids]
        if segments is not None:  # something that depends on the segments, on their device
            logits = logits + (segments == segments[:, :1]).unsqueeze(-1).to(logits.dtype)
        if attention_mask is not None:  # ... on the mask, on its device
            logits = logits + attention_mask[:, 0].sum(-1, keepdim=True).to(logits.dtype)
        if input_noise is not None:
            logits = logits + input_noise.sum(-1, keepdim=True).to(logits.dtype)
        if rope_positions is not None:
            logits = logits + rope_positions[None, :, None].to(logits.dtype)
        if logit_positions is not None:
            return logits[logit_positions].unsqueeze(1)
        return logits.transpose(0, 1)


class StandInEngine:
    """The engine's single-rank contract: batches arrive on `device`, plain CE."""

    def __init__(self, device):
        self.device = device
        self.calls = []

    @staticmethod
    def cross_entropy(logits, targets):
        return F.cross_entropy(logits.float(), targets, reduction="none")

    @staticmethod
    def correct(logits, targets):
        return logits.argmax(dim=-1) == targets

    def broadcast_batch(self, batch, keys, shape):
        self.calls.append((batch is not None, keys, shape))
        if batch is None:  # a peer receives the reading rank's tensors
            return {key: torch.zeros(shape, dtype=torch.int64, device=self.device) for key in keys}
        return {key: batch[key].to(self.device) for key in keys}


def _run(overrides: list[str], device) -> Run:
    cfg = load_config(["model=tiny", f"data.seq_len={SEQ}", f"train.micro_batch_size={MBS}", *overrides])
    derived = derive(cfg, 1, vocab_size=VOCAB, mask_id=VOCAB - 1)
    run = Run(cfg, derived, Topology(), StandInEngine(device), None, Path("unused"))
    run.stage_keys, run.reads_data = stage_data_keys(cfg, run.topo), True
    return run


def _samples(index: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(int(index[0]))
    tokens = torch.randint(0, VOCAB - 1, (len(index), SEQ), generator=g)
    return {"tokens": tokens, "segments": (torch.arange(SEQ) >= SEQ // 3).long().expand(len(index), SEQ)}


def _step(overrides: list[str], device, model=None) -> dict:
    """One global batch through forward_step and loss_fn, summed as run_schedule does."""
    run = _run(overrides, device)
    model, reports, grads = model or StandInDenoiser(device), [], []
    plan = step_plan(run.cfg, 1)
    for batch in microbatches(run, 0, _samples, plan):
        output, loss = forward_step(run, 3, plan, batch, model)
        loss_sum, count, report = loss(output)
        loss_sum.backward()
        reports.append(report)
        grads.append(count)
    total = sum_reports(reports, device)
    return {"total": total, "counts": grads, "grad": model.table.grad, "reports": reports}


OPTIONS = [
    [],
    ["objective.logits=all", "objective.normalization=masked"],
    ["model.logit_shift=true", "objective.t_sampling=stratified"],
    ["model.attention=document", "objective.weighting=uniform"],
    ["curriculum=dfactory_band", "model.attention=document"],  # complementary pairs, t band
    ["curriculum.random_length_prob.values=[1.0]", "model.logit_shift=true"],  # a cut batch
    ["curriculum.bidirectional_ratio.values=[0.3]", "model.attention=document"],  # annealed mask
    ["curriculum.block_size.values=[4]", "model.attention=document", "model.logit_shift=true"],  # [x_t, x0]
    ["curriculum=llada2_wsd", "objective.logits=all"],  # block size 1 at step 1, every position scored
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_step_keeps_every_tensor_on_the_model_device(options):
    """forward_step, loss_fn and the metric sum on a non-CPU device: nothing they create
    lands on the CPU (the simulated device raises on a mix, as a GPU does), every result
    is on the device, and the values are the CPU run's."""
    cpu = _step(options, torch.device("cpu"))
    with simulated_device():
        on_device = _step(options, DEVICE)
        assert isinstance(on_device["total"], OnDevice) and on_device["total"].device == DEVICE
        assert all(isinstance(r["stats"], OnDevice) for r in on_device["reports"])
        assert all(isinstance(c, OnDevice) for c in on_device["counts"])
        assert isinstance(on_device["grad"], OnDevice)
        got = values({k: on_device[k] for k in ("total", "counts", "grad")})
    assert cpu["total"][3] > 0  # something was masked and scored
    torch.testing.assert_close(got["total"], cpu["total"])
    torch.testing.assert_close(got["grad"], cpu["grad"])
    assert [int(c) for c in got["counts"]] == [int(c) for c in cpu["counts"]]


def test_the_simulated_device_catches_a_cpu_tensor_mixed_in():
    """Control: the mix that broke step 1 on a GPU (a CPU count stacked with a device
    loss, a CPU accumulator) raises here."""
    with simulated_device():
        loss = torch.ones(3, device=DEVICE).sum()
        with pytest.raises(RuntimeError, match="same device"):
            torch.stack([loss, torch.tensor(3.0)])
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(4, dtype=torch.float64) + torch.ones(4, dtype=torch.float64, device=DEVICE)


def _topo(tp: int, pp: int, rank: int) -> Topology:
    return Topology(world_size=tp * pp, tp=tp, pp=pp, dp=1, rank=rank)


@pytest.mark.parametrize(
    ("attention", "expected"),
    [
        ("bidirectional", [("tokens",), (), (), ("tokens",)]),
        ("document", [("tokens", "segments"), ("segments",), ("segments",), ("tokens", "segments")]),
    ],
)
def test_stage_data_keys(attention, expected):
    """First and last pipeline stages need tokens (input, targets); middle stages need
    nothing but the segments of document attention."""
    cfg = load_config([f"model.attention={attention}", "model.num_layers=4"])
    assert [stage_data_keys(cfg, _topo(1, 4, rank)) for rank in range(4)] == expected


def test_microbatches_are_read_only_by_the_reading_rank():
    """The reading rank reads each microbatch once and hands it to the engine's broadcast;
    a tensor-parallel peer and a middle pipeline stage read nothing."""
    run = _run(["train.global_batch_size=8"], torch.device("cpu"))
    read = []

    def samples(index):
        read.append(index.tolist())
        return _samples(index)

    batches = list(microbatches(run, 8, samples, step_plan(run.cfg, 1)))
    assert [b["index"].tolist() for b in batches] == read == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(batches[1]["tokens"], _samples(torch.arange(12, 16))["tokens"])
    assert run.engine.calls == [(True, ("tokens",), (MBS, SEQ))] * 2
    for reads_data, keys in ((False, ("tokens",)), (False, ())):  # a TP peer; a middle stage
        run.reads_data, run.stage_keys, run.engine.calls, read[:] = reads_data, keys, [], []
        batches = microbatches(run, 0, samples, step_plan(run.cfg, 1))
        assert [sorted(b) for b in batches] == [sorted(["index", *keys])] * 2
        assert read == [] and run.engine.calls == [(False, keys, (MBS, SEQ))] * 2


def test_hybrid_loss_weights_the_clean_copys_next_token_loss():
    """ar_weight 1, dlm_weight 0: the loss is exactly the mean next-token cross entropy of
    the clean copy (here the stand-in's logits of each token); dlm_weight 0.3 on top adds
    0.3 x the diffusion loss of the same step."""
    hybrid = [
        "model.logit_shift=true",
        "curriculum.block_size.values=[4]",
        "curriculum.ar_weight.values=[1.0]",
    ]
    model = TableOnly(torch.device("cpu"))
    ar_only = _step([*hybrid, "curriculum.dlm_weight.values=[0.0]"], torch.device("cpu"), model)["total"]
    tokens = torch.cat(
        [_samples(torch.arange(0, MBS))["tokens"], _samples(torch.arange(MBS, 2 * MBS))["tokens"]]
    )
    logits = model.table[tokens[:, :-1]].reshape(-1, VOCAB)  # the stand-in ignores attention
    expected = F.cross_entropy(logits, tokens[:, 1:].reshape(-1)).item()
    assert float(ar_only[0] / ar_only[1]) == pytest.approx(expected, rel=1e-6)
    assert float(ar_only[4] / ar_only[5]) == pytest.approx(expected, rel=1e-6)
    both = _step([*hybrid, "curriculum.dlm_weight.values=[0.3]"], torch.device("cpu"), model)["total"]
    dlm_only = _step([*hybrid, "curriculum.ar_weight.values=[0.0]"], torch.device("cpu"), model)["total"]
    assert float(both[0] / both[1]) == pytest.approx(
        expected + 0.3 * float(dlm_only[0] / dlm_only[1]), rel=1e-6
    )


class TableOnly(StandInDenoiser):
    """Logits of each input token alone (no attention, positions or noise)."""

    def __call__(self, input_ids, logit_positions=None, **_):
        logits = self.table[input_ids]
        return logits[logit_positions].unsqueeze(1) if logit_positions is not None else logits.transpose(0, 1)
