"""dlm-pretrain's training side. Importing it (data/ and parallel/ import it too) refuses
`python -m <package>.<module>` for a module that is not a command, instead of importing
it and exiting 0 having done nothing."""

import sys

# `python -m` these runs their command (the README and recipes name them)
ENTRY_MODULES = (
    "pretrain",
    "pretrain.cli",
    "pretrain.train",
    "pretrain.evaluate",
    "pretrain.sample",
    "pretrain.report",
)
PACKAGES = ("pretrain", "data", "parallel")  # a module of these run with -m is checked

# the command behind a module that is not one
COMMAND_OF_MODULE = {
    "pretrain.convert": "import-hf|export-hf",
    "data.tokenizer": "tokenizer",
    "data.prepare": "prepare",
}


def module_being_run() -> str | None:
    """MODULE of `python [options] -m MODULE ...` while Python locates it (sys.argv[0] is
    then '-m'), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    for number, arg in enumerate(sys.orig_argv[1:], 1):
        if arg == "-m":
            return sys.orig_argv[number + 1] if number + 1 < len(sys.orig_argv) else None
        if arg.startswith("-m"):
            return arg[2:]
    return None


def refuse_non_command_module() -> None:
    module = module_being_run()
    if module is None or module in ENTRY_MODULES or module.split(".")[0] not in PACKAGES:
        return
    command = COMMAND_OF_MODULE.get(module, "<command>")
    print(
        f"python -m {module}: this module is not a command; run\n"
        f"  dlm {command} [key=value ...]   (or: python -m pretrain.cli {command} ...)\n"
        f"`dlm --help` lists the commands, `dlm <command> --help` their keys",
        file=sys.stderr,
    )
    sys.exit(2)


refuse_non_command_module()
