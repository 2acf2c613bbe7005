"""`dlm sample` / pretrain.sample: LLaDA's sampler on plain transformers models.

Tiny random GemmaForCausalLM (use_bidirectional_attention=True, the default export) and
LlamaForCausalLM (causal by default, `format=source`) models, fake models with known
logits for the selection rules, and the command line on a saved model with a tiny
sentencepiece tokenizer. CPU, no downloads. Expected values are computed here from the
definitions (LLaDA generate.py), not read from the code under test.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from pretrain import cli
from pretrain.sample import (
    _gumbel_argmax,
    check_schedule,
    denoiser_logits,
    generate,
    generate_ids,
    get_num_transfer_tokens,
    load,
    resolve_logit_shift,
    resolve_mask_token_id,
)

VOCAB = 64
MASK = 4
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def dlm_block(mask_id: int, fmt: str, arch: str, *, shift: bool = False, bidirectional: bool = True) -> dict:
    return {
        "mask_token_id": mask_id,
        "logit_shift": shift,
        "bidirectional": bidirectional,
        "format": fmt,
        "source_architecture": arch,
    }


def tiny_gemma(vocab: int = VOCAB, mask_id: int = MASK, seed: int = 0) -> GemmaForCausalLM:
    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=vocab, head_dim=8, use_bidirectional_attention=True, **TINY)
    model = GemmaForCausalLM(config).eval()
    model.config.dlm = dlm_block(mask_id, "bidirectional", "LlamaForCausalLM")
    model.config.mask_token_id = mask_id
    return model


def tiny_llama(
    vocab: int = VOCAB, mask_id: int = MASK, seed: int = 1, attn: str = "sdpa"
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(LlamaConfig(vocab_size=vocab, **TINY), attn_implementation=attn)
    model.eval()
    model.config.dlm = dlm_block(mask_id, "source", "LlamaForCausalLM", bidirectional=False)
    model.config.mask_token_id = mask_id
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is ~50x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


class Recorder(torch.nn.Module):
    """Wraps a model: records every forward call's input ids and attention mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.inputs, self.masks = [], []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.inputs.append(input_ids.clone())
        self.masks.append(attention_mask)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class FixedLogits(torch.nn.Module):
    """A fake denoiser whose logits do not depend on the input: (L, V) rows given."""

    def __init__(self, logits: torch.Tensor, *, mask_id: int = MASK, shift: bool = False):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(dlm={"mask_token_id": mask_id, "logit_shift": shift})
        self.inputs = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.inputs.append(input_ids.clone())
        rows = self.logits[: input_ids.shape[1]]
        return SimpleNamespace(logits=rows.expand(input_ids.shape[0], -1, -1).clone())


def peaked_logits(length: int, tokens: list[int], margins: list[float], vocab: int = VOCAB) -> torch.Tensor:
    """Row j: token tokens[j] with logit margins[j], everything else 0 (confidence rises with margin)."""
    logits = torch.zeros(length, vocab)
    for j, (tok, margin) in enumerate(zip(tokens, margins, strict=True)):
        logits[j, tok] = margin
    return logits


# ----------------------------------------------------------------------------- schedule


def test_num_transfer_tokens_spreads_evenly():
    mask_index = torch.zeros(3, 10, dtype=torch.bool)
    mask_index[0, :10] = True
    mask_index[1, :7] = True
    got = get_num_transfer_tokens(mask_index, 4)
    assert got.dtype == torch.int64
    # 10 over 4 steps: 2 each, the first 10 % 4 = 2 steps one more; 7: 1 each, first 3 one more
    assert got.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]
    assert got.sum(1).tolist() == [10, 7, 0]


@pytest.mark.parametrize(
    "gen_length, steps, block_length, key",
    [
        (64, 64, 24, "block_length=24"),
        (64, 3, 32, "steps=3"),
        (16, 32, 8, "steps=32"),
        (0, 8, 8, "gen_length=0"),
        (16, 0, 8, "steps=0"),
        (16, 8, -8, "block_length=-8"),
    ],
)
def test_bad_schedules_name_the_key(gen_length, steps, block_length, key):
    with pytest.raises(ValueError, match=key):
        check_schedule(gen_length, steps, block_length)


def test_steps_per_block():
    assert check_schedule(64, 64, 32) == 32
    assert check_schedule(64, 16, 16) == 4
    assert check_schedule(12, 12, 12) == 12


# ----------------------------------------------------------------------------- real tiny models


@pytest.mark.parametrize("which", ["gemma", "llama"])
@pytest.mark.parametrize(
    "temperature, remasking", [(0.0, "low_confidence"), (1.0, "random"), (0.7, "low_confidence")]
)
def test_output_keeps_prompt_and_has_no_mask(which, temperature, remasking, request):
    model = request.getfixturevalue(which)
    prompt = torch.tensor([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    out = generate_ids(
        model, prompt, gen_length=16, steps=8, block_length=8, temperature=temperature, remasking=remasking
    )
    assert out.shape == (2, 5 + 16) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert not (out == MASK).any()
    assert ((out >= 0) & (out < VOCAB)).all()


def test_tokens_unmasked_per_step_follow_the_schedule(llama):
    model = Recorder(llama)
    prompt_len, gen_length, block_length, steps = 3, 14, 7, 6  # 2 blocks, 3 steps each, 7 = 3 + 2 + 2
    out = generate_ids(model, [20, 21, 22], gen_length=gen_length, steps=steps, block_length=block_length)
    assert len(model.inputs) == steps
    masked = [int((x == MASK).sum()) for x in model.inputs] + [int((out == MASK).sum())]
    assert masked == [14, 11, 9, 7, 4, 2, 0]
    # blocks are filled left to right: while block 1 is decoded block 2 stays fully masked, and
    # every step fills positions of the current block only
    states = [*model.inputs, out]
    for k in range(steps):
        block = k // 3
        start = prompt_len + block * block_length
        filled = (states[k] == MASK) & (states[k + 1] != MASK)
        where = filled[0].nonzero().flatten()
        assert ((where >= start) & (where < start + block_length)).all(), (k, where)
        assert (states[k][0, start + block_length :] == MASK).all()
        assert (states[k][0, :start] != MASK).all()


def test_every_forward_gets_a_full_4d_mask(llama):
    model = Recorder(llama)
    generate_ids(model, [[5, 6], [7, 8]], gen_length=4, steps=4, block_length=2)
    for mask in model.masks:
        assert mask is not None and mask.shape == (2, 1, 6, 6)
        assert mask.dtype == torch.float32 and torch.count_nonzero(mask) == 0  # additive: attend everywhere


def test_denoiser_is_bidirectional_for_a_causal_source_model(llama, gemma):
    x = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    y = x.clone()
    y[0, -1] = 30
    # control: called as-is the source model is causal, position 0 ignores the last token
    assert torch.equal(llama(x).logits[0, 0], llama(y).logits[0, 0])
    assert not torch.allclose(denoiser_logits(llama, x)[0, 0], denoiser_logits(llama, y)[0, 0])
    # same as transformers' boolean "attend everywhere" 4D mask
    full = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(denoiser_logits(llama, x), llama(input_ids=x, attention_mask=full).logits)
    # a no-op for the bidirectional Gemma export, which is already a denoiser when called plainly
    assert not torch.allclose(gemma(x).logits[0, 0], gemma(y).logits[0, 0])
    torch.testing.assert_close(denoiser_logits(gemma, x), gemma(x).logits)


def test_eager_attention_takes_the_additive_mask(llama):
    eager = tiny_llama(attn="eager")
    eager.load_state_dict(llama.state_dict())
    x = torch.tensor([[3, 9, 27, 17, 51, 25]])
    torch.testing.assert_close(denoiser_logits(eager, x), denoiser_logits(llama, x), rtol=1e-5, atol=1e-5)


def test_attention_without_4d_masks_is_refused():
    model = FixedLogits(torch.zeros(4, VOCAB))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        denoiser_logits(model, torch.zeros(1, 4, dtype=torch.long))


def test_temperature_zero_is_deterministic_and_seed_drives_sampling(gemma):
    kw = dict(gen_length=16, steps=16, block_length=8)
    state = torch.random.get_rng_state()
    a = generate_ids(gemma, [7, 8, 9], temperature=0.0, seed=0, **kw)
    b = generate_ids(gemma, [7, 8, 9], temperature=0.0, seed=123, **kw)
    assert torch.equal(a, b)
    s0 = generate_ids(gemma, [7, 8, 9], temperature=1.0, seed=0, **kw)
    s0_again = generate_ids(gemma, [7, 8, 9], temperature=1.0, seed=0, **kw)
    s1 = generate_ids(gemma, [7, 8, 9], temperature=1.0, seed=1, **kw)
    assert torch.equal(s0, s0_again)
    assert not torch.equal(s0, s1)
    assert torch.equal(torch.random.get_rng_state(), state)  # a private generator: global RNG untouched


# ----------------------------------------------------------------------------- selection rules


def test_low_confidence_unmasks_the_most_confident_first():
    prompt = [1, 2]
    tokens = [40, 41, 42, 43, 44, 45]
    margins = [1.0, 5.0, 3.0, 6.0, 2.0, 4.0]
    logits = peaked_logits(8, [0, 0, *tokens], [0.0, 0.0, *margins])
    model = FixedLogits(logits)
    out = generate_ids(model, prompt, gen_length=6, steps=3, block_length=6)
    assert out[0].tolist() == [*prompt, *tokens]
    filled = [
        ((a == MASK) & (b != MASK))[0].nonzero().flatten().tolist()
        for a, b in zip(model.inputs, [*model.inputs[1:], out], strict=True)
    ]
    # 2 per step, highest margins first: positions (2 + index of) 6, 5 | 4, 3 | 2, 1
    assert [sorted(f) for f in filled] == [[3, 5], [4, 7], [2, 6]]


def test_a_more_confident_later_block_waits_its_turn():
    # block 2 (positions 4..5) is far more confident than block 1 (2..3)
    logits = peaked_logits(6, [0, 0, 40, 41, 42, 43], [0.0, 0.0, 1.0, 2.0, 9.0, 8.0])
    model = FixedLogits(logits)
    out = generate_ids(model, [1, 2], gen_length=4, steps=4, block_length=2)
    seen = [*model.inputs, out]
    first_filled = [
        int(((a == MASK) & (b != MASK))[0].nonzero()[0]) for a, b in zip(seen[:-1], seen[1:], strict=True)
    ]
    assert first_filled == [3, 2, 4, 5]


def test_random_remasking_order_depends_on_the_seed_only():
    logits = peaked_logits(10, [0, 0, *range(40, 48)], [0.0, 0.0, *range(1, 9)])

    def order(seed: int) -> list[int]:
        model = FixedLogits(logits)
        out = generate_ids(
            model, [1, 2], gen_length=8, steps=8, block_length=8, remasking="random", seed=seed
        )
        assert out[0, 2:].tolist() == list(range(40, 48))
        seen = [*model.inputs, out]
        return [
            int(((a == MASK) & (b != MASK))[0].nonzero()[0]) for a, b in zip(seen[:-1], seen[1:], strict=True)
        ]

    orders = {tuple(order(seed)) for seed in range(4)}
    assert order(3) == order(3)
    assert len(orders) == 4  # 8! orders: four seeds giving four different ones
    assert tuple(range(9, 1, -1)) not in orders  # not the low-confidence order (margins rise with position)


def test_mask_and_padding_ids_are_never_predicted():
    logits = torch.zeros(5, VOCAB)
    logits[:, MASK] = 50.0  # the mask token is the argmax everywhere
    logits[:, 60] = 40.0  # then a padding id beyond the tokenizer's vocabulary
    logits[:, 33] = 30.0
    out = generate_ids(FixedLogits(logits), [1], gen_length=4, steps=4, block_length=4, vocab_size=50)
    assert out[0, 1:].tolist() == [33] * 4


def test_gumbel_noise_is_llada_gumbel_max():
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(5))
    for temperature in (0.5, 1.0, 2.0):
        got = _gumbel_argmax(logits, temperature, torch.Generator().manual_seed(9))
        u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        llada = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
        assert torch.equal(got, llada)
    # Gumbel-max samples softmax(logits / T): P(token 1) = 3 / 4 at T = 1
    two = torch.tensor([0.0, torch.log(torch.tensor(3.0))]).expand(20000, 2)
    freq = _gumbel_argmax(two, 1.0, torch.Generator().manual_seed(0)).double().mean()
    assert abs(freq - 0.75) < 0.015
    assert torch.equal(_gumbel_argmax(logits, 0.0, torch.Generator()), logits.argmax(-1))


# ----------------------------------------------------------------------------- logit shift, mask id


def test_logit_shift_reads_the_previous_position():
    # row i predicts token 20 + i: shifted, position j gets 20 + (j - 1)
    logits = peaked_logits(7, [20 + i for i in range(7)], [5.0] * 7)
    unshifted = generate_ids(FixedLogits(logits), [1, 2, 3], gen_length=4, steps=4, block_length=4)
    assert unshifted[0, 3:].tolist() == [23, 24, 25, 26]
    shifted_cfg = generate_ids(
        FixedLogits(logits, shift=True), [1, 2, 3], gen_length=4, steps=4, block_length=4
    )
    assert shifted_cfg[0, 3:].tolist() == [22, 23, 24, 25]
    explicit = generate_ids(
        FixedLogits(logits), [1, 2, 3], gen_length=4, steps=4, block_length=4, logit_shift=True
    )
    assert torch.equal(explicit, shifted_cfg)
    off = generate_ids(
        FixedLogits(logits, shift=True), [1, 2, 3], gen_length=4, steps=4, block_length=4, logit_shift=False
    )
    assert torch.equal(off, unshifted)
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate_ids(FixedLogits(logits, shift=True), [], gen_length=4, steps=4, block_length=4)


def test_shifted_denoiser_logits_are_the_previous_rows(llama):
    x = torch.tensor([[3, 4, 5, 6, 7]])
    plain, shifted = denoiser_logits(llama, x), denoiser_logits(llama, x, logit_shift=True)
    torch.testing.assert_close(shifted[:, 1:], plain[:, :-1])


def test_mask_id_and_shift_resolution():
    model = FixedLogits(torch.zeros(2, VOCAB), mask_id=9, shift=True)
    assert resolve_mask_token_id(model) == 9
    assert resolve_mask_token_id(model, None, 11) == 11
    assert resolve_logit_shift(model) is True and resolve_logit_shift(model, False) is False
    top = SimpleNamespace(config=SimpleNamespace(mask_token_id=7))
    assert resolve_mask_token_id(top) == 7 and resolve_logit_shift(top) is False
    assert (
        resolve_mask_token_id(SimpleNamespace(config=SimpleNamespace()), SimpleNamespace(mask_token_id=4))
        == 4
    )
    with pytest.raises(ValueError, match="mask_token_id=..."):
        resolve_mask_token_id(SimpleNamespace(config=SimpleNamespace()))


# ----------------------------------------------------------------------------- saved models, CLI


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data.config import TokenizerConfig
    from data.hf_tokenizer import export_hf
    from data.tokenizer import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    stdlib_json = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    path, _ = train_tokenizer(TokenizerConfig(input=[stdlib_json], output=str(out), vocab_size=512))
    export_hf(Tokenizer(path), out)
    return out


def save(model, directory: Path, tokenizer_dir: Path | None = None) -> Path:
    model.save_pretrained(directory)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """A Gemma export with the 512-piece tokenizer; its output layer padded to 640 rows."""
    return save(tiny_gemma(vocab=640, mask_id=4), tmp_path_factory.mktemp("gemma"), tokenizer_dir)


def test_load_returns_model_and_tokenizer(exported, tmp_path):
    model, tokenizer = load(exported)
    assert type(model).__name__ == "GemmaForCausalLM" and not model.training
    assert model.config.dlm["mask_token_id"] == 4 and tokenizer.mask_token_id == 4
    assert json.loads((exported / "config.json").read_text())["dlm"]["format"] == "bidirectional"
    bare = save(tiny_llama(), tmp_path / "bare")
    model, tokenizer = load(bare)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing")


def test_generate_text_stays_in_the_tokenizer_vocabulary(exported):
    model, tokenizer = load(exported)
    kw = dict(gen_length=16, steps=16, block_length=8)
    text = generate(model, tokenizer, "def f(x):", **kw)
    assert isinstance(text, str)
    prompt_ids = tokenizer("def f(x):").input_ids
    ids = generate_ids(model, prompt_ids, vocab_size=len(tokenizer), **kw)
    assert (ids < 512).all()
    assert text == tokenizer.decode(ids[0, len(prompt_ids) :].tolist(), skip_special_tokens=True)
    # sampling with and without the restriction: without it, padding rows (ids 512..639) are drawn
    for restrict in (len(tokenizer), None):
        drawn = torch.cat(
            [
                generate_ids(model, prompt_ids, temperature=1.0, seed=seed, vocab_size=restrict, **kw)
                for seed in range(4)
            ]
        )
        assert (drawn >= 512).any() == (restrict is None)
    # no tokenizer: ids in, generated ids out
    assert generate(model, None, prompt_ids, **kw) == ids[0, len(prompt_ids) :].tolist()


def test_cli_samples_a_saved_model(exported, capsys):
    args = ["sample", f"model={exported}", "prompt='def f(x):'", "gen_length=16", "steps=8", "block_length=8"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load(exported)
    want = generate(model, tokenizer, "def f(x):", gen_length=16, steps=8, block_length=8)
    assert printed == want + "\n"


def test_cli_byte_level_model_without_tokenizer_files(tmp_path, capsys):
    directory = save(tiny_gemma(vocab=384, mask_id=259), tmp_path / "bytes")
    assert (
        cli.main(["sample", f"model={directory}", "prompt=abc", "gen_length=8", "steps=8", "block_length=8"])
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")


def test_cli_prompt_file_and_source_model(tmp_path, tokenizer_dir, capsys):
    directory = save(tiny_llama(vocab=512), tmp_path / "llama", tokenizer_dir)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import json\n")
    args = [
        "sample",
        f"model={directory}",
        f"prompt_file={prompt}",
        "gen_length=8",
        "steps=4",
        "block_length=4",
    ]
    assert cli.main([*args, "temperature=0.8", "remasking=random", "seed=3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([], "model"),
        (["block_length=24"], "block_length=24"),
        (["steps=3"], "steps=3"),
        (["remasking=greedy"], "remasking"),
        (["temperature=-1"], "temperature"),
        (["bogus=1"], "bogus"),
        (["steps=many"], "steps"),
        (["device=tpu9"], "device"),
    ],
)
def test_cli_config_errors_exit_2_naming_the_key(exported, overrides, key, capsys):
    model = [] if overrides == [] else [f"model={exported}"]
    assert cli.main(["sample", *model, *overrides]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and key in err


def test_cli_missing_directory_and_unknown_mask_exit_2(tmp_path, tokenizer_dir, capsys):
    assert cli.main(["sample", f"model={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = tiny_llama()
    del model.config.dlm, model.config.mask_token_id
    directory = save(model, tmp_path / "nomask")
    assert cli.main(["sample", f"model={directory}", "prompt=x"]) == 2
    assert "mask_token_id=" in capsys.readouterr().err
    shifted = tiny_llama(vocab=512)
    shifted.config.dlm["logit_shift"] = True
    directory = save(shifted, tmp_path / "shifted", tokenizer_dir)
    assert cli.main(["sample", f"model={directory}", "prompt=''"]) == 2
    assert "prompt" in capsys.readouterr().err


def test_cli_unloadable_model_exits_1(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForC')
    assert cli.main(["sample", f"model={tmp_path / 'broken'}"]) == 1
    assert "cannot load" in capsys.readouterr().err
