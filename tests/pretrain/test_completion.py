"""Shell completion: candidates, the cached table, and the bash script driving them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import cli, completion
from tests.dist import REPO


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "dlm-pretrain" / "completion.json"


def complete(capsys, shell: str, line: str) -> list[str]:
    assert completion.complete_main([shell, line, "=:"] if shell == "bash" else [shell, line]) == 0
    return capsys.readouterr().out.split()


def test_candidates(cache, capsys):
    assert complete(capsys, "zsh", "dlm tr") == ["train"]
    assert set(cli.COMMANDS) <= set(complete(capsys, "zsh", "dlm "))
    first = complete(capsys, "zsh", "dlm train ")
    assert {"model=", "curriculum=", "hydra/launcher=", "seed=", "train.", "optim."} <= set(first)
    assert "train.steps=" not in first  # a section's keys once the section is typed
    assert "train.steps=" in complete(capsys, "zsh", "dlm train train.")
    assert complete(capsys, "zsh", "dlm train curriculum=llada2") == [
        "curriculum=llada2_noise",
        "curriculum=llada2_wsd",
    ]
    assert complete(capsys, "zsh", "dlm train model.attention=d") == ["model.attention=document"]
    assert complete(capsys, "zsh", "dlm train model.qkv_bias=") == [
        "model.qkv_bias=true",
        "model.qkv_bias=false",
    ]
    assert complete(capsys, "zsh", "dlm train hydra/launcher=sub") == [
        "hydra/launcher=submitit_local",
        "hydra/launcher=submitit_slurm",
    ]
    assert complete(capsys, "zsh", "dlm train --cfg ") == ["job", "hydra", "all"]
    assert "--seed-checkpoint" in complete(capsys, "zsh", "dlm train --")
    assert complete(capsys, "zsh", "dlm sample mo") == ["model="]  # sample's model is a key
    assert "checkpoint=" in complete(capsys, "zsh", "dlm eval ")
    # bash has split the word at '=': it gets the part after it
    assert complete(capsys, "bash", "dlm train model=ti") == ["tiny"]


def test_table_is_cached_and_rebuilt_when_sources_change(cache, capsys, monkeypatch):
    complete(capsys, "zsh", "dlm train ")
    assert cache.is_file()
    monkeypatch.setattr(completion, "build_table", lambda: pytest.fail("rebuilt though nothing changed"))
    assert complete(capsys, "zsh", "dlm tr") == ["train"]
    monkeypatch.setattr(completion, "fingerprint", lambda: "changed")
    monkeypatch.setattr(completion, "build_table", lambda: {"fresh": {}})
    assert complete(capsys, "zsh", "dlm fr") == ["fresh"]


def test_fingerprint_follows_conf_presets(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "conf" / "model").mkdir(parents=True)
    monkeypatch.setattr(completion, "ROOT", root)
    before = completion.fingerprint()
    (root / "conf" / "model" / "new.yaml").write_text("name: new\n")
    assert completion.fingerprint() != before


def test_install_scripts(capsys):
    assert cli.main(["--shell-completion", "install=bash"]) == 0
    assert "complete -o default -F _dlm_complete dlm" in capsys.readouterr().out
    assert cli.main(["train", "--shell-completion", "install=zsh"]) == 0
    assert "compdef _dlm_complete dlm" in capsys.readouterr().out
    assert cli.main(["--shell-completion", "install=fish"]) == 2


def test_bash_script_completes_through_dlm(tmp_path):
    """The installed bash function, driven as bash's completion would drive it."""
    script = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "--shell-completion", "install=bash"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    driver = f"""
{script}
compopt() {{ echo compopt "$@"; }}   # only callable inside real completion
drive() {{ COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}; _dlm_complete; echo "reply: ${{COMPREPLY[*]}}"; }}
drive 'dlm train curriculum=llada2_w'
drive 'dlm train optim.l'
drive 'dlm prep'
"""
    bin_dir = Path(sys.executable).parent  # where `dlm` is installed
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == [
        "reply: llada2_wsd",
        "compopt -o nospace",
        "reply: optim.lr=",
        "reply: prepare",
    ]
