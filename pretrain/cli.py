"""The `dlm` command: `dlm <subcommand> [hydra overrides...]`."""

from __future__ import annotations

import sys

USAGE = """usage: dlm <command> [key=value ...]

commands:
  train    pretrain a masked diffusion LM (Hydra overrides, see conf/)
           --seed-checkpoint: write step_0 weights and stop

examples:
  dlm train model=tiny train.steps=20 checkpoint.every=10 run.dir=/tmp/r1
  torchrun --nproc-per-node 2 -m pretrain.train model=tiny parallel.tp=2 run.dir=/tmp/r2
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from pretrain.train import main as train_main

        return train_main(rest)
    print(f"dlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
