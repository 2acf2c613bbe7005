"""`dlm import-hf` / `dlm export-hf` throughput and memory against a plain file copy.

    .venv/bin/python bench/convert_throughput.py [--layers 20] [--dir /tmp] [--keep]

Synthesizes a random Llama checkpoint on disk without ever holding it in memory (bf16,
hidden 2048, 16 heads / 8 KV groups, ffn 5632, vocab 32000, untied; 20 layers ~ 2.2 GB in
~1 GB safetensors shards, written tensor by tensor), then times, each in a fresh process:

- `cp -r` of the source directory (the I/O floor: the same bytes read and written once);
- import at TP=1 (one process) and at TP=2 (torchrun, 2 processes), fp32 megatron checkpoint;
- export of the TP=2 import in one process (bf16 Gemma safetensors, 1 GB files).

Prints seconds, the ratio to the copy, and peak RSS (the command's own per-rank figure and
the largest child's ru_maxrss) relative to the source size. Everything written is deleted
at the end unless --keep. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parallel.hf_files import HFArch, write_tensors  # noqa: E402


def synthesize(path: Path, layers: int) -> int:
    """A random LlamaForCausalLM checkpoint (config.json + sharded bf16 safetensors)."""
    import json

    arch = HFArch("LlamaForCausalLM", 2048, layers, 16, 8, 5632, 32000, 4096, 500000.0, 1e-5, False, False)
    path.mkdir(parents=True)
    shapes = arch.hf_shapes()
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                yield name, 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                yield name, 0.02 * torch.randn(shape, generator=gen, dtype=torch.bfloat16)

    write_tensors(path, shapes, torch.bfloat16, 1_000_000_000, tensors())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_seq_len,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_base,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sum(f.stat().st_size for f in path.iterdir())


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def dlm(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "pretrain.cli",
        *args,
    ]


def children_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dlm-bench-convert-", dir=args.dir))
    try:
        start = time.perf_counter()
        size = synthesize(work / "src", args.layers)
        print(f"source: random Llama, {args.layers} layers, {size / 1e9:.2f} GB bf16 "
              f"(synthesized in {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        subprocess.run(["sync"])
        copy_s, _ = run(["cp", "-r", str(work / "src"), str(work / "copy")])
        shutil.rmtree(work / "copy")
        print(f"cp -r: {copy_s:.1f} s ({size / 1e9 / copy_s:.2f} GB/s)", flush=True)
        src, quiet = f"source={work / 'src'}", "progress=false"
        steps = [
            ("import tp=1", 1, ["import-hf", src, f"output={work / 'imp1'}", quiet]),
            ("import tp=2", 2, ["import-hf", src, f"output={work / 'imp2'}", "parallel.tp=2", quiet]),
            ("export tp=1", 1, ["export-hf", f"checkpoint={work / 'imp2'}", f"output={work / 'exp'}",
                                "dtype=bfloat16", "max_shard_size=1GB", quiet]),
        ]  # fmt: skip
        for name, nproc, argv in steps:
            seconds, out = run(dlm(nproc, argv))
            rss = re.search(r"peak RSS ([\d.]+) GB/rank \(sum ([\d.]+) GB\)", out)
            wrote = re.search(r"wrote ([\d.]+) GB", out)
            print(
                f"{name}: {seconds:.1f} s = {seconds / copy_s:.1f}x cp; wrote {wrote.group(1)} GB; "
                f"peak RSS {rss.group(1)} GB/rank = {float(rss.group(1)) * 1e9 / size:.2f}x "
                f"source (sum {rss.group(2)} GB); largest child so far {children_peak_gb():.2f} GB",
                flush=True,
            )
            if name == "import tp=1":
                shutil.rmtree(work / "imp1")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
