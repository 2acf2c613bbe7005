"""The `dlm` command: `dlm <subcommand> [hydra overrides...]`."""

from __future__ import annotations

import sys

USAGE = """usage: dlm <command> [key=value ...]

commands:
  tokenizer  train a sentencepiece tokenizer (+ Hugging Face files)   conf/tokenizer.yaml
  prepare    tokenize, pack and shard a corpus into webdataset tars    conf/prepare.yaml
  train      pretrain a masked diffusion LM                            conf/config.yaml
             --seed-checkpoint: write step_0 weights and stop
  import-hf  Hugging Face Llama/Mistral/Qwen2 -> sharded DLM checkpoint conf/import_hf.yaml
  export-hf  DLM checkpoint -> Hugging Face model + tokenizer           conf/export_hf.yaml
  sample     generate with an exported model (LLaDA-style remasking)   conf/sample.yaml
  eval       NLL bound (nats/token, bits/byte) of a checkpoint          checkpoint=PATH [key=value ...]
  report     PNG plots + summary comparing runs: RUN_DIR [RUN_DIR ...] [--out DIR]

examples:
  dlm tokenizer input=[stdlib] output=data/tok vocab_size=8000
  dlm prepare input=[stdlib] output=data/stdlib tokenizer=data/tok/tokenizer.model seq_len=2048
  dlm train model=tiny train.steps=20 checkpoint.every=10 run.dir=/tmp/r1
  torchrun --nproc-per-node 2 -m pretrain.train model=tiny parallel.tp=2 run.dir=/tmp/r2
  dlm report /tmp/r1 /tmp/r2 --out /tmp/compare
"""


def run_data_command(name: str, argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from parallel.topology import ConfigError
    from pretrain.config import load_command_config

    try:
        cfg = load_command_config(name, argv)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        cause = f"\n  {e.__cause__}" if e.__cause__ else ""
        print(f"dlm {name}: invalid configuration: {e}{cause}", file=sys.stderr)
        return 2
    if name == "tokenizer":
        from data.tokenizer import run
    else:
        from data.prepare import run
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input under on_error=fail, missing files
        print(f"dlm {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from pretrain.train import main as train_main

        return train_main(rest)
    if command in ("tokenizer", "prepare"):
        return run_data_command(command, rest)
    if command in ("import-hf", "export-hf"):
        from pretrain import convert

        return convert.import_main(rest) if command == "import-hf" else convert.export_main(rest)
    if command == "sample":
        from pretrain.sample import main as sample_main

        return sample_main(rest)
    if command == "eval":
        from pretrain.evaluate import main as eval_main

        return eval_main(rest)
    if command == "report":
        from pretrain.report import main as report_main

        return report_main(rest)
    print(f"dlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
