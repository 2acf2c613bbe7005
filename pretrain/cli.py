"""The `dlm` command: `dlm <command> [key=value | group=option ...] [flags]`.

Every command behaves as a Hydra application: `--help` (groups, keys, types, defaults
and descriptions from the dataclass schemas), `--cfg job|hydra|all [--resolve]` and
`--info` (print and exit: no process group, no data), `-m/--multirun` sweeps through
Hydra's launcher plug-ins (pretrain/sweep.py), a "did you mean" for misspelt keys and
groups, and shell completion (pretrain/completion.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    name: str
    purpose: str
    main: str  # "module:function" taking the arguments after the command, returning an exit code
    schema: str = ""  # "module:Dataclass" typing its keys; "" for report (plain arguments)
    config: str | None = None  # conf/<config>.yaml; None: the checkpoint's config.yaml (eval)
    groups: tuple[str, ...] = ()  # config groups of conf/ it takes (group=option)
    output_key: str | None = None  # what each job of a sweep writes into: <sweep dir>/<job number>
    flags: tuple[tuple[str, str], ...] = ()  # its own --flags: (flag, description)
    examples: tuple[str, ...] = ()
    extra_keys: tuple[tuple[str, str], ...] = ()  # keys outside the schema: (key, description)
    subcommands: tuple[str, ...] = ()  # its first argument is one of these (dlm slurm submit)
    subcommand_optional: bool = False  # ... or may be omitted (dlm prepare [merge])
    plain_subcommands: tuple[str, ...] = ()  # subcommands taking plain arguments (dlm slurm status RUN)


TRAIN_GROUPS = (
    "model", "data", "mixture", "parallel", "optim", "zero", "curriculum", "cluster", "experiment",
)  # fmt: skip

COMMANDS = {
    c.name: c
    for c in (
        Command(
            "tokenizer",
            "train a sentencepiece tokenizer (+ Hugging Face files)",
            "pretrain.cli:tokenizer_main",
            "data.config:TokenizerConfig",
            "tokenizer",
            output_key="output",
            examples=("dlm tokenizer input=[stdlib] output=data/tok vocab_size=8000",),
        ),
        Command(
            "prepare",
            "tokenize, pack and shard a corpus into webdataset tars (or Megatron .bin/.idx)",
            "pretrain.cli:prepare_main",
            "data.config:PrepareConfig",
            "prepare",
            output_key="output",
            examples=(
                "dlm prepare input=[stdlib] output=data/stdlib tokenizer=data/tok/tokenizer.model",
                "dlm prepare input=[/c] output=/d tokenizer=t.model partitions=8 partition=$TASK",
                "dlm prepare merge input=[/c] output=/d tokenizer=t.model partitions=8",
                "dlm prepare input=[stdlib] output=data/mg tokenizer=t.model format=megatron",
            ),
            subcommands=("merge",),
            subcommand_optional=True,
        ),
        Command(
            "train",
            "pretrain a masked diffusion LM",
            "pretrain.train:main",
            "pretrain.config:Config",
            "config",
            groups=TRAIN_GROUPS,
            output_key="run.dir",
            flags=(("--seed-checkpoint", "write step_0 weights (no optimizer) and stop"),),
            examples=(
                "dlm train model=tiny train.steps=20 checkpoint.every=10 run.dir=/tmp/r1",
                "dlm train experiment=stdlib_cpu curriculum=llada optim.lr=1e-3",
                "dlm train --cfg job --resolve model=small parallel.tp=2",
                "dlm train -m optim.lr=1e-3,3e-4 curriculum=constant,llada run.dir=runs/sweep",
                "torchrun --nproc-per-node 2 -m pretrain.train model=tiny parallel.tp=2 run.dir=/tmp/r2",
            ),
        ),
        Command(
            "import-hf",
            "Hugging Face Llama/Mistral/Qwen2 -> sharded DLM checkpoint",
            "pretrain.convert:import_main",
            "pretrain.convert:ImportHFConfig",
            "import_hf",
            output_key="output",
            examples=("dlm import-hf source=hf/Qwen2-0.5B output=imports/qwen mask_token=append",),
        ),
        Command(
            "export-hf",
            "DLM checkpoint -> Hugging Face model + tokenizer",
            "pretrain.convert:export_main",
            "pretrain.convert:ExportHFConfig",
            "export_hf",
            output_key="output",
            examples=("dlm export-hf checkpoint=runs/r1 output=exports/r1",),
        ),
        Command(
            "sample",
            "generate with an exported model (LLaDA-style remasking)",
            "pretrain.sample:main",
            "pretrain.sample:SampleConfig",
            "sample",
            examples=("dlm sample model=exports/r1 prompt=\"'def parse('\" gen_length=64 steps=64",),
        ),
        Command(
            "eval",
            "held-out NLL bound (nats/token, bits/byte) of a checkpoint",
            "pretrain.evaluate:main",
            "pretrain.config:Config",
            None,
            groups=TRAIN_GROUPS,
            output_key="output",
            examples=(
                "dlm eval checkpoint=runs/r1 eval.draws=16 eval.batches=8",
                "dlm eval checkpoint=runs/r1 data=stdlib_shards",
                "dlm eval -m checkpoint=runs/a,runs/b eval.draws=4,16 output=runs/evals",
            ),
            extra_keys=(
                ("checkpoint", "required: a checkpoint, its checkpoints/ or its run directory (latest)"),
                ("output", "also write eval.json into this directory (each job's, in a sweep)"),
                ("<other keys>", "override the checkpoint's saved config.yaml; defaults below are train's"),
            ),
        ),
        Command(
            "slurm",
            "Slurm: a training job (preemption-safe), the whole pipeline as dependent jobs, their status",
            "pretrain.slurm:main",
            "pretrain.config:Config",
            "config",
            groups=TRAIN_GROUPS,
            flags=(("--dry-run", "render and print the batch script, do not submit it"),),
            examples=(
                "dlm slurm submit cluster=h100 cluster.nodes=2 experiment=llada_8b run.dir=/scratch/llada",
                "dlm slurm submit --dry-run model=tiny cluster.tasks_per_node=2 run.dir=runs/r1",
                "dlm slurm pipeline cluster=h100 experiment=llada_8b 'pipeline.input=[/data/corpus]' "
                "pipeline.partitions=16 run.dir=/scratch/llada",
                "dlm slurm status /scratch/llada",
            ),
            subcommands=("submit", "pipeline", "status"),
            plain_subcommands=("status",),
        ),
        Command(
            "mixture",
            "what each source of a data mixture contributes to a run (tokens, epochs), before it starts",
            "pretrain.mixture:main",
            "pretrain.config:Config",
            "config",
            groups=TRAIN_GROUPS,
            examples=(
                "dlm mixture show web_code_math train.steps=100000 train.global_batch_size=1024",
                "dlm mixture show 'data.sources=[{path:a,weight:1},{path:b,tokens:1000000,max_epochs:2}]'",
            ),
            subcommands=("show",),
            plain_subcommands=("show",),
        ),
        Command(
            "plan",
            "the parallel layouts of a model on a GPU cluster: memory, step time, MFU, cost",
            "pretrain.plan:main",
            "pretrain.config:Config",
            "config",
            groups=TRAIN_GROUPS,
            examples=(
                "dlm plan model=dense_100b cluster=h100 plan.gpus=512 data.seq_len=4096 "
                "train.global_batch_size=1024 plan.tokens=2e12",
            ),
        ),
        Command(
            "report",
            "PNG plots + summary comparing runs",
            "pretrain.report:main",
            examples=("dlm report runs/r1 runs/r2 --out runs/compare",),
        ),
    )
}


def function(path: str):
    """'module:name' -> the object, imported on demand (commands load only what they use)."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def usage() -> str:
    lines = ["usage: dlm <command> [key=value | group=option ...] [--help] [--cfg job] [-m]", "", "commands:"]
    lines += [f"  {c.name:<10} {c.purpose}" for c in COMMANDS.values()]
    lines += [
        "",
        "`dlm <command> --help` lists a command's config groups and keys. Shell completion:",
        '  eval "$(dlm --shell-completion install=bash)"   (zsh: install=zsh)',
        "",
        "examples:",
    ]
    lines += [f"  {c.examples[0]}" for c in COMMANDS.values()]
    return "\n".join(lines)


# -- flags -----------------------------------------------------------------------------------------
CFG_CHOICES = ("job", "hydra", "all")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


@dataclass
class Flags:
    help: bool = False
    cfg: str | None = None
    resolve: bool = False
    info: str | None = None
    multirun: bool = False
    completion: str | None = None
    own: list[str] = field(default_factory=list)  # the command's own flags, passed on


APP_FLAGS = {
    "-h, --help": "this help",
    "-c, --cfg job|hydra|all": "print the composed, validated config and exit (creates nothing)",
    "--resolve": "with --cfg: resolve interpolations, as the run saves config.yaml",
    "-i, --info [WHAT]": "Hydra's report and exit; WHAT: " + "|".join(INFO_CHOICES),
    "-m, --multirun": "a sweep: one run per combination of comma lists (pretrain/sweep.py)",
    "--shell-completion install=bash|zsh": "print the completion script (eval it in your shell rc)",
}


def parse_flags(command: Command, argv: list[str]) -> tuple[Flags, list[str]]:
    """Split `--flags` from `key=value` overrides; unknown flags are a ConfigError."""
    from parallel.topology import ConfigError

    flags, overrides, args = Flags(), [], list(argv)
    own = {flag for flag, _ in command.flags}
    while args:
        arg = args.pop(0)
        name, _, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-h", "--help"):
            flags.help = True
        elif name in ("-c", "--cfg"):
            flags.cfg = _flag_value(name, attached or (args.pop(0) if args else ""), CFG_CHOICES)
        elif arg == "--resolve":
            flags.resolve = True
        elif name in ("-i", "--info"):
            value = attached or (args.pop(0) if args and args[0] in INFO_CHOICES else "all")
            flags.info = _flag_value(name, value, INFO_CHOICES)
        elif arg in ("-m", "--multirun"):
            flags.multirun = True
        elif name in ("-sc", "--shell-completion"):
            flags.completion = attached or (args.pop(0) if args else "")
        elif arg in own:
            flags.own.append(arg)
        elif arg.startswith("-") and command.schema:
            from pretrain.confdoc import did_you_mean

            known = ["--help", "--cfg", "--resolve", "--info", "--multirun", "--shell-completion", *own]
            raise ConfigError(f"unknown option {arg}" + did_you_mean(name, known))
        else:
            overrides.append(arg)
    if flags.resolve and not flags.cfg:
        raise ConfigError("--resolve goes with --cfg job|hydra|all")
    return flags, overrides


def _flag_value(flag: str, value: str, choices: tuple[str, ...]) -> str:
    from parallel.topology import ConfigError

    if value not in choices:
        from pretrain.confdoc import did_you_mean

        hint = did_you_mean(value, list(choices))
        raise ConfigError(f"{flag} takes one of {', '.join(choices)} (got {value or 'nothing'!r}){hint}")
    return value


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-sc", "--shell-completion") or argv[0].startswith("--shell-completion="):
        argv = ["train", *argv]  # the script completes every command
    if argv[0] == "__complete":
        from pretrain.completion import complete_main

        return complete_main(argv[1:])
    command = COMMANDS.get(argv[0])
    if command is None:
        from pretrain.confdoc import did_you_mean

        hint = did_you_mean(argv[0], list(COMMANDS))
        print(f"dlm: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(command, argv[1:])


def run_command(command: Command, argv: list[str]) -> int:
    if not command.schema:  # report: its own argument parser, --help included
        return function(command.main)(argv)
    from hydra.errors import HydraException

    from parallel.topology import ConfigError

    sub = argv[:1] if command.subcommands and argv and argv[0] in command.subcommands else []
    if sub and sub[0] in command.plain_subcommands:
        return function(command.main)(argv)
    try:
        if (
            command.subcommands
            and not sub
            and not command.subcommand_optional
            and not {"-h", "--help"} & set(argv)
        ):
            raise ConfigError(
                f"dlm {command.name} takes a subcommand first: {', '.join(command.subcommands)}"
            )
        flags, overrides = parse_flags(command, argv[len(sub) :])
        if flags.help:
            from pretrain.app import command_help

            print(command_help(command))
            return 0
        if flags.completion is not None:
            from pretrain.completion import script

            print(script(flags.completion))
            return 0
        from pretrain.app import check_command_overrides

        check_command_overrides(command, overrides)
        return dispatch(command, flags, overrides, sub)
    except (ConfigError, HydraException) as e:  # HydraException: an override's syntax
        return config_error(command, e)


def dispatch(command: Command, flags: Flags, overrides: list[str], sub: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from parallel.topology import ConfigError
    from pretrain import app

    try:
        if flags.cfg:
            print(app.show_config(command, overrides, flags.cfg, flags.resolve), end="")
            return 0
        if flags.info:
            app.show_info(command, overrides, flags.info)
            return 0
        if flags.multirun:
            if sub:
                raise ConfigError(
                    f"dlm {command.name} {sub[0]} does not sweep (Slurm sweeps: dlm train -m "
                    "hydra/launcher=submitit_slurm ...)"
                )
            from pretrain.sweep import multirun

            return multirun(command, overrides, flags.own)
    except (HydraException, OmegaConfBaseException) as e:
        return config_error(command, e)
    return function(command.main)(sub + overrides + flags.own)


def config_error(command: Command, error: Exception) -> int:
    from parallel.topology import cause_line

    print(f"dlm {command.name}: invalid configuration: {error}{cause_line(error)}", file=sys.stderr)
    return 2


def tokenizer_main(argv: list[str]) -> int:
    return run_data_command("tokenizer", argv)


def prepare_main(argv: list[str]) -> int:
    """`dlm prepare [merge] ...`: merge combines the parts of an array job (partitions=N,
    without partition=), preparing any part not complete."""
    merge = bool(argv) and argv[0] == "merge"
    return run_data_command("prepare", argv[1:] if merge else argv, merge=merge)


def run_data_command(name: str, argv: list[str], merge: bool = False) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from parallel.topology import ConfigError, cause_line
    from pretrain.config import load_command_config

    try:
        cfg = load_command_config(name, argv)
        if merge and (cfg.partitions == 1 or cfg.partition is not None):
            raise ConfigError(
                "dlm prepare merge combines the parts of partitions=N (N > 1, the array job's) and takes no "
                f"partition= (got partitions={cfg.partitions}, partition={cfg.partition})"
            )
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"dlm {name}: invalid configuration: {e}{cause_line(e)}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
