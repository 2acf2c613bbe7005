"""`dlm` as a Hydra application: --help, --cfg, --info, suggestions, `python -m` entry points."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import yaml

import pretrain
from pretrain import cli
from pretrain.confdoc import all_keys, is_schema, key_type
from pretrain.config import CONF_DIR
from tests.dist import QUIET, REPO, launch

SCHEMA_COMMANDS = [name for name, command in cli.COMMANDS.items() if command.schema]
TINY = ["model=tiny", "data.max_bytes=200000", "train.global_batch_size=4", "train.micro_batch_size=2"]


def run_dlm(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def help_keys(schema) -> list[str]:
    """Sections' fields (model.hidden_size, curriculum.t_min) and top-level values."""
    return [
        k
        for k in all_keys(schema)
        if k.count(".") == 1 or (k.count(".") == 0 and not is_schema(key_type(schema, k)))
    ]


@pytest.mark.parametrize("name", SCHEMA_COMMANDS)
def test_help_lists_groups_options_and_every_key(capsys, name):
    command = cli.COMMANDS[name]
    code, out, _ = run_dlm(capsys, name, "--help")
    assert code == 0
    assert out.startswith(f"dlm {name}: {command.purpose}")
    for group in command.groups:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{group} "))
        for option in (p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            assert option in line, (group, option)
    schema = cli.function(command.schema)
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    for key in help_keys(schema):
        assert key.split(".", 1)[-1] in listed, key
    assert "--cfg" in out and "--multirun" in out and "examples:" in out


def test_help_shows_defaults_types_and_field_docs(capsys):
    _, out, _ = run_dlm(capsys, "train", "--help")
    line = next(line for line in out.splitlines() if line.split()[:1] == ["steps"])
    assert line.split()[1:3] == ["int", "100"] and "optimizer steps" in line
    model_line = next(line for line in out.splitlines() if line.strip().startswith("model "))
    assert "tiny (default)" in model_line and "small (default)" not in model_line
    dir_line = next(line for line in out.splitlines() if line.split()[:1] == ["dir"])
    assert "runs/${model.name}-${data.name}" in dir_line  # the default as written, unresolved
    _, out, _ = run_dlm(capsys, "sample", "--help")
    assert next(line for line in out.splitlines() if line.split()[:1] == ["model"]).split()[2] == "required"


def test_top_level_help_and_unknown_command(capsys):
    code, out, _ = run_dlm(capsys, "--help")
    assert code == 0 and all(name in out for name in cli.COMMANDS)
    code, _, err = run_dlm(capsys, "trian")
    assert code == 2 and "did you mean `train`?" in err


def test_cfg_job_is_the_saved_config_and_creates_nothing(tmp_path):
    overrides = [*TINY, *QUIET, "optim.lr=3e-3", "curriculum=llada", "train.steps=1"]
    run_dir = tmp_path / "run"
    printed = {}
    for flags in (["--cfg", "job"], ["--cfg", "job", "--resolve"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pretrain.cli", "train", *flags, *overrides, f"run.dir={run_dir}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        printed[flags[-1]] = proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no outputs/, no .hydra
    assert "${model.name}" not in printed["--resolve"]
    launch(1, ["train", *overrides, f"run.dir={run_dir}"], module="pretrain.cli")
    saved = (run_dir / "config.yaml").read_text()
    assert printed["--resolve"] == saved
    unresolved = yaml.safe_load(printed["job"])
    assert unresolved["optim"]["lr"] == 3e-3 and unresolved["curriculum"]["name"] == "llada"
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(OmegaConf.create(printed["job"]), resolve=True) == yaml.safe_load(saved)


def test_cfg_and_info_start_no_process_group(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_dlm(capsys, "train", "--cfg", "job", "run.dir=r", "model=small")
    assert code == 0 and yaml.safe_load(out)["model"]["name"] == "small"
    assert not torch.distributed.is_initialized()
    code, out, _ = run_dlm(capsys, "train", "--cfg", "hydra")
    assert code == 0 and list(yaml.safe_load(out)) == ["hydra"]
    code, out, _ = run_dlm(capsys, "train", "--cfg", "all", "--resolve")
    assert code == 0 and {"hydra", "train", "model"} <= set(yaml.safe_load(out))
    code, out, _ = run_dlm(capsys, "train", "--info", "defaults", "curriculum=llada")
    assert code == 0 and "Defaults List" in out and "curriculum/llada" in out
    code, out, _ = run_dlm(capsys, "export-hf", "--info", "searchpath")
    assert code == 0 and f"file://{CONF_DIR}" in out
    assert list(tmp_path.iterdir()) == []


def test_cfg_validates(capsys):
    code, _, err = run_dlm(capsys, "train", "--cfg", "job", "train.steps=0")
    assert code == 2 and "train.steps=0 must be positive" in err
    code, _, err = run_dlm(capsys, "tokenizer", "--cfg", "job")
    assert code == 2 and "output" in err  # mandatory


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "train.stepz=3"], "`train.stepz`: no such key; did you mean `train.steps`?"),
        (["train", "trian.steps=3"], "did you mean `train.steps`"),
        (["train", "modle=tiny"], "did you mean `model`?"),
        (["train", "model=tinyy"], "no such option in conf/model/"),
        (["train", "-m", "curriculum=llada,lada"], "did you mean `curriculum=llada`?"),
        (["train", "+foo=1"], "`foo`: no such key"),
        (["train", "--cfgg", "job"], "unknown option --cfgg; did you mean `--cfg`?"),
        (["train", "--cfg", "jbo"], "did you mean `job`?"),
        (["train", "--resolve"], "--resolve goes with --cfg"),
        (["eval", "checkpoint=x", "eval.drawz=3"], "did you mean `eval.draws`?"),
        (["tokenizer", "vocab_sise=10"], "did you mean `vocab_size`?"),
        (["prepare", "seq_lne=10"], "did you mean `seq_len`?"),
        (["import-hf", "mask_tokn=append"], "did you mean `mask_token`?"),
        (["export-hf", "parallel.tpp=2"], "did you mean `parallel.tp`"),
        (["sample", "temprature=1"], "did you mean `temperature`?"),
        (["train", "pipeline.eval_args=[eval.batches=2]"], "no viable alternative at input"),  # syntax
        (["slurm", "pipeline", "pipeline.stagez=[train]"], "did you mean `pipeline.stages`"),
    ],
)
def test_misspelt_keys_groups_and_flags_get_the_closest_name(capsys, argv, expected):
    code, out, err = run_dlm(capsys, *argv)
    assert code == 2 and expected in err and out == ""


def test_python_m_non_command_modules_print_usage_and_exit_2():
    modules = [
        f"{package}.{path.stem}"
        for package in pretrain.PACKAGES
        for path in sorted((REPO / package).glob("*.py"))
        if path.stem not in ("__init__", "__main__")
        and f"{package}.{path.stem}" not in pretrain.ENTRY_MODULES
    ]
    assert "pretrain.convert" in modules and "data.prepare" in modules
    for module in modules:
        proc = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2, module
        assert f"python -m {module}: this module is not a command" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.convert"], cwd=REPO, capture_output=True, text=True
    )
    assert "dlm import-hf|export-hf" in proc.stderr


@pytest.mark.parametrize("module", pretrain.ENTRY_MODULES)
def test_python_m_entry_modules_run_their_command(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    command = {"pretrain.train": "train", "pretrain.evaluate": "eval", "pretrain.sample": "sample"}.get(
        module
    )
    if command:
        assert proc.stdout.startswith(f"dlm {command}:")
    elif module == "pretrain.report":
        assert "dlm report" in proc.stdout
    else:
        assert proc.stdout.startswith("usage: dlm <command>")


def test_the_module_check_leaves_imports_alone():
    """Importing a module (not running it) is untouched, including under `python -m pytest`."""
    code = "import pretrain.convert, data.prepare, parallel.model; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok"


def test_modules_the_docs_run_are_entry_modules():
    """Every `-m <module>` of ours in the README, Makefile and bench/ runs its command."""
    texts = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "bench").glob("*"))]
    named = {m for path in texts if path.is_file() for m in re.findall(r"-m ([\w.]+)", path.read_text())}
    ours = {m for m in named if m.split(".")[0] in pretrain.PACKAGES}
    assert {"pretrain.train", "pretrain.cli"} <= ours
    assert ours <= set(pretrain.ENTRY_MODULES)
