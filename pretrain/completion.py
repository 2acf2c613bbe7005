"""Shell completion for `dlm`: commands, flags, keys (key=), groups and their options
(group=option), booleans and fixed choices (model.attention=document).

    eval "$(dlm --shell-completion install=bash)"     # in ~/.bashrc
    eval "$(dlm --shell-completion install=zsh)"      # in ~/.zshrc (after compinit)

The script calls `dlm __complete <shell> <line>` at each TAB. The candidates come from
the dataclass schemas and conf/ (pretrain/confdoc.py); reading them imports torch (~2 s),
so they are kept in a table in ~/.cache/dlm-pretrain/ that is rebuilt when a source file
or a conf/ preset changes: a TAB then takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")

BASH = r"""
_dlm_complete() {
    local IFS=$'\n'
    COMPREPLY=($(dlm __complete bash "${COMP_LINE:0:COMP_POINT}" "$COMP_WORDBREAKS" 2>/dev/null))
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[=.] ]]; then
        compopt -o nospace
    fi
}
complete -o default -F _dlm_complete dlm
"""

ZSH = r"""
_dlm_complete() {
    local -a candidates open
    candidates=("${(@f)$(dlm __complete zsh "${BUFFER[1,CURSOR]}" 2>/dev/null)}")
    open=(${(M)candidates:#*[=.]})
    compadd -Q -S '' -- "${open[@]}"
    compadd -Q -- "${candidates[@]:|open}"
}
compdef _dlm_complete dlm
"""


def script(setting: str) -> str:
    """`--shell-completion install=bash|zsh`: the script to eval."""
    shells = {"install=bash": BASH, "install=zsh": ZSH}
    if setting not in shells:
        from parallel.topology import ConfigError

        raise ConfigError(
            f"--shell-completion takes install=bash or install=zsh (got {setting or 'nothing'!r})"
        )
    return shells[setting].strip()


def complete_main(argv: list[str]) -> int:
    """`dlm __complete <bash|zsh> <line up to the cursor> [bash's COMP_WORDBREAKS]`."""
    if len(argv) < 2:
        return 2
    shell, line = argv[0], argv[1]
    token = "" if not line or line[-1].isspace() else _split(line)[-1]
    words = _split(line)[: None if token == "" else -1]
    found = candidates(words, token)
    if shell == "bash":  # bash splits the word at '=' and ':': it wants what follows
        breaks = argv[2] if len(argv) > 2 else "=:"
        cut = max((token.rfind(c) for c in breaks if not c.isspace()), default=-1) + 1
        found = [c[cut:] for c in found]
    print("\n".join(found))
    return 0


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # an open quote
        return line.split()


def candidates(words: list[str], token: str) -> list[str]:
    """What may complete `token` after `words` (words[0] is dlm)."""
    table = load_table()
    if len(words) < 2:
        return _matching([*table["commands"], "--help", "--shell-completion"], token)
    spec = table["commands"].get(words[1])
    if spec is None:
        return []
    previous = words[-1]
    if previous in ("-c", "--cfg"):
        return _matching(["job", "hydra", "all"], token)
    if token.startswith("-"):
        return _matching(spec["flags"], token)
    key, sep, _ = token.partition("=")
    if sep:
        return _matching([f"{key}={value}" for value in _values(spec, key)], token)
    names = [f"{group}=" for group in spec["groups"]] + ["hydra/launcher="] * bool(spec["keys"])
    for name in spec["keys"]:  # sections first (train.), their keys once one is typed
        section, dot, _ = name.partition(".")
        names.append(f"{name}=" if not dot or "." in token else f"{section}.")
    return _matching(dict.fromkeys(names), token)


def _values(spec: dict, key: str) -> list[str]:
    if key in spec["groups"]:
        return spec["groups"][key]
    if key == "hydra/launcher":
        return list(LAUNCHERS)
    if key in spec["bools"]:
        return ["true", "false"]
    return spec["choices"].get(key, [])


def _matching(names, token: str) -> list[str]:
    return [name for name in names if name.startswith(token)]


# -- the table -------------------------------------------------------------------------------------
def fingerprint() -> str:
    """Changes when a source file or a conf/ preset does."""
    files = [*ROOT.glob("pretrain/*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("parallel/*.py")]
    files += ROOT.glob("conf/**/*.yaml")
    stats = sorted((str(f), f.stat().st_mtime_ns) for f in files)
    return hashlib.sha1(repr(stats).encode()).hexdigest()


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlm-pretrain" / "completion.json"


def load_table() -> dict:
    path, stamp = cache_path(), fingerprint()
    try:
        table = json.loads(path.read_text())
        if table.get("fingerprint") == stamp:
            return table
    except (OSError, ValueError):
        pass
    table = {"fingerprint": stamp, "commands": build_table()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: complete anyway, uncached
        print(f"dlm: completion cache not written: {e}", file=sys.stderr)
    return table


def build_table() -> dict:
    """Per command: its flags, groups with options, keys, boolean keys and choices."""
    from pretrain.cli import APP_FLAGS, COMMANDS, function
    from pretrain.confdoc import all_keys, group_options, is_schema, key_type
    from pretrain.config import CHOICES, CONF_DIR

    table = {}
    for name, command in COMMANDS.items():
        flags = [part.strip().split(" ")[0] for flag in APP_FLAGS for part in flag.split(",")]
        spec = {"flags": flags + [flag for flag, _ in command.flags], "groups": {}, "keys": []}
        spec.update(bools=[], choices={})
        if command.schema:
            schema = function(command.schema)
            leaves = [k for k in all_keys(schema) if not is_schema(key_type(schema, k))]
            spec["groups"] = group_options(CONF_DIR, command.groups)
            spec["keys"] = [k for k, _ in command.extra_keys if not k.startswith("<")] + leaves
            spec["bools"] = [k for k in leaves if key_type(schema, k) in (bool, bool | None)]
            spec["choices"] = {k: list(v) for k, v in CHOICES.items() if k in leaves and command.groups}
        else:
            spec["flags"] = ["--help", "--out"]
        table[name] = spec
    return table
