"""Throughput of `dlm prepare` (data/prepare.py) with 1 and 2 tokenizer workers.

    .venv/bin/python bench/prepare_throughput.py [--rounds 2] [--workers 1,2] [--vocab 8000]
    .venv/bin/python bench/prepare_throughput.py --tokenizer tok/tokenizer.model --input my.jsonl

Without --tokenizer, first trains a BPE tokenizer (`--vocab`, default 8k) on the input
(`stdlib` by default: this Python's standard library, ~31 MB, ~10 s). Then runs the real
command, `python -m pretrain.cli prepare input=[...] seq_len=2048 workers=N progress=false`,
into a fresh temporary directory per run, interleaved (1,2 then 2,1, ...) because the speed
of a shared machine drifts, and prints per configuration (median over rounds):

- prepare tokens/s: the command's own figure (its summary line: tokens tokenized / seconds
  of `data.prepare.run`, i.e. resolving and hashing the inputs, reading, tokenizing,
  packing and writing the shards and the manifest);
- wall tokens/s: the same tokens over the wall time of the whole command, Python and
  Hydra start-up included;

and the scaling ratio of the first and last worker counts. Figures are printed, never
asserted. Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATE = re.compile(r"\(([\d.]+)M tokens/s, (\d+) workers\)")


def prepare(inputs: list[str], tokenizer: str, out: Path, workers: int, seq_len: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "prepare",
        f"input=[{','.join(inputs)}]",
        f"output={out}",
        f"tokenizer={tokenizer}",
        f"seq_len={seq_len}",
        f"workers={workers}",
        "progress=false",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dlm prepare failed:\n{proc.stderr[-3000:]}")
    summary = proc.stdout.splitlines()[0]
    match = RATE.search(summary)
    if not match or int(match.group(2)) != workers:
        raise SystemExit(f"unexpected summary line: {summary}")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["tokens"] + manifest["tokens_dropped"]
    return {
        "tokens": tokens,
        "documents": manifest["documents_written"],
        "prepare_rate": float(match.group(1)) * 1e6,
        "wall": wall,
        "wall_rate": tokens / wall,
        "sha": [s["sha256"] for s in manifest["splits"]["train"]["shards"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default="stdlib", help="comma-separated inputs (default: stdlib)")
    ap.add_argument("--tokenizer", default=None, help="an existing .model (default: train one)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    inputs = args.input.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="dlm-prepare-bench-"))
    try:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from data.config import TokenizerConfig
            from data.tokenizer import train_tokenizer

            start = time.perf_counter()
            path, report = train_tokenizer(
                TokenizerConfig(input=inputs, output=str(root / "tok"), vocab_size=args.vocab)
            )
            tokenizer = str(path)
            print(
                f"tokenizer: BPE {args.vocab} on {inputs} ({report['documents_used']:,} documents) "
                f"in {time.perf_counter() - start:.1f} s"
            )
        results: dict[int, list[dict]] = {w: [] for w in workers}
        for r in range(args.rounds):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                out = root / f"out-w{w}-r{r}"
                res = prepare(inputs, tokenizer, out, w, args.seq_len)
                shutil.rmtree(out)
                results[w].append(res)
                print(
                    f"  round {r} workers={w}: {res['tokens']:,} tokens, "
                    f"prepare {res['prepare_rate'] / 1e6:.2f}M "
                    f"tok/s, wall {res['wall']:.1f} s ({res['wall_rate'] / 1e6:.2f}M tok/s)"
                )
        shas = {tuple(res["sha"]) for runs in results.values() for res in runs}
        first = results[workers[0]][0]
        print(
            f"\ndlm prepare on {inputs}: {first['documents']:,} documents, {first['tokens']:,} tokens, "
            f"seq_len={args.seq_len}, median of {args.rounds} rounds; identical shards in every run: "
            f"{len(shas) == 1}"
        )
        medians = {}
        for w in workers:
            prep = statistics.median(x["prepare_rate"] for x in results[w])
            wall = statistics.median(x["wall_rate"] for x in results[w])
            medians[w] = (prep, wall)
            print(f"  workers={w}: {prep / 1e6:.2f}M tokens/s (prepare)   {wall / 1e6:.2f}M tokens/s (wall)")
        a, b = workers[0], workers[-1]
        if a != b:
            print(
                f"  scaling workers={b} / workers={a}: {medians[b][0] / medians[a][0]:.2f}x (prepare), "
                f"{medians[b][1] / medians[a][1]:.2f}x (wall)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
