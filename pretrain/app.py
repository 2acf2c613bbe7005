"""The Hydra-application side of `dlm <command>` (pretrain/cli.py dispatches here):
--help from the schemas, --cfg and --info without starting anything, and the check of
overrides against the schema with "did you mean" answers."""

from __future__ import annotations

from contextlib import contextmanager

from omegaconf import OmegaConf

from parallel.topology import ConfigError
from pretrain.cli import APP_FLAGS, Command, function
from pretrain.confdoc import KeyDoc, check_overrides, group_options, key_docs


def command_options(command: Command) -> dict[str, list[str]]:
    from pretrain.config import CONF_DIR

    return group_options(CONF_DIR, command.groups)


def check_command_overrides(command: Command, overrides: list[str]) -> None:
    extra = [key for key, _ in command.extra_keys]
    check_overrides(overrides, function(command.schema), command_options(command), extra)


# -- composing -------------------------------------------------------------------------------------
@contextmanager
def hydra_app(command: Command):
    """Hydra initialised with this command's config search path; yields the config name.
    `dlm sample`'s config is composed from the ConfigStore alone (pretrain/sample.py says why)."""
    from hydra import initialize, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pretrain.config import CONF_DIR, register

    register()
    GlobalHydra.instance().clear()
    job_name = f"dlm_{command.name.replace('-', '_')}"
    if command.name == "sample":
        from pretrain.sample import register_sample_config

        with initialize(config_path=None, version_base="1.3", job_name=job_name):
            yield register_sample_config()
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
            yield command.config


def load_validated(command: Command, overrides: list[str]):
    """The typed config a run of this command would use, every check that needs neither
    a process group nor data passed (ConfigError naming the key otherwise)."""
    if command.name in ("train", "slurm"):
        from pretrain.config import load_config

        return load_config(overrides)
    if command.name == "eval":
        from pretrain.evaluate import load_eval_config

        return load_eval_config(overrides)[1]
    if command.name == "sample":
        from pretrain.sample import load_sample_config

        return load_sample_config(overrides)
    from pretrain.config import load_command_config

    return load_command_config(command.config, overrides)


def show_config(command: Command, overrides: list[str], which: str, resolve: bool) -> str:
    """`--cfg job|hydra|all [--resolve]`: the composed config, validated first. The job
    config resolved is exactly what a run saves as config.yaml; unresolved it keeps
    interpolations such as run.dir's ${model.name}, as Hydra prints them."""
    cfg = load_validated(command, overrides)
    if command.config is None or (which == "job" and resolve):
        if which != "job":
            raise ConfigError(
                f"dlm {command.name} composes no Hydra config (its checkpoint's): --cfg job only"
            )
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    with hydra_app(command) as config_name:
        node = compose(config_name=config_name, overrides=overrides, return_hydra_config=which != "job")
        if command.name in ("train", "slurm"):
            from pretrain.config import adopt_checkpoint_model

            adopt_checkpoint_model(node, overrides)
        if which != "job":
            HydraConfig.instance().set_config(node)  # ${hydra:...} resolves against it
        if which == "hydra":
            node = OmegaConf.masked_copy(node, ["hydra"])
        return OmegaConf.to_yaml(resolved(node) if resolve else node)


def resolved(node):
    """The node with every interpolation resolved that can be outside a sweep: those
    needing a sweep's values (hydra.sweep.subdir: ${hydra.job.num}) stay as written."""
    from omegaconf.errors import InterpolationResolutionError

    if OmegaConf.is_list(node):
        return [resolved(node._get_node(index)) for index in range(len(node))]
    if OmegaConf.is_dict(node):
        return {key: resolved(node._get_node(key)) for key in node.keys()}
    try:
        return node._dereference_node()._value() if node._is_interpolation() else node._value()
    except InterpolationResolutionError:
        return node._value()


def show_info(command: Command, overrides: list[str], which: str) -> None:
    """`--info`: Hydra's own report (config search path, defaults list and tree, plugins)."""
    if command.config is None:
        print(
            f"dlm {command.name}: the config is the checkpoint's config.yaml (checkpoint=PATH) with the "
            f"overrides on top; group=option merges conf/<group>/<option>.yaml"
        )
        return
    from hydra.core.global_hydra import GlobalHydra

    with hydra_app(command) as config_name:
        GlobalHydra.instance().hydra.show_info(which, config_name, overrides)


# -- help ------------------------------------------------------------------------------------------
def command_help(command: Command) -> str:
    """`dlm <command> --help`: purpose, usage, groups and their options, every key (type,
    default, description), flags, examples."""
    defaults = _defaults(command)
    keys = key_docs(function(command.schema), defaults)
    options = command_options(command)
    parts = [f"dlm {command.name}: {command.purpose}", "", _usage(command)]
    if options:
        parts += ["", "config groups (group=option; conf/<group>/<option>.yaml):"]
        parts += [_group_line(group, choices, defaults) for group, choices in options.items()]
    parts += ["", "keys (key=value):"] + [f"  {key:<14}  {text}" for key, text in command.extra_keys]
    parts += _key_lines(keys)
    flags = [*APP_FLAGS.items(), *command.flags]
    parts += ["", "options:"] + [f"  {flag:<36}  {text}" for flag, text in flags]
    parts += ["", "examples:"] + [f"  {example}" for example in command.examples]
    return "\n".join(parts)


def _usage(command: Command) -> str:
    settings = "key=value | group=option" if command.groups else "key=value"
    sub = f" {'|'.join(command.subcommands)}" if command.subcommands else ""
    sub = f" [{sub.strip()}]" if command.subcommand_optional else sub
    line = f"usage: dlm {command.name}{sub} [{settings} ...] [options]"
    if command.name in ("train", "eval", "import-hf", "export-hf"):
        module = {"train": "train", "eval": "evaluate"}.get(command.name, "cli " + command.name)
        line += f"\n       torchrun --nproc-per-node N -m pretrain.{module} [same arguments]"
    return line


def _defaults(command: Command):
    """The composed default config with Hydra's node (its values are the defaults shown,
    hydra.runtime.choices the default option of each group); eval has none of its own:
    the training defaults."""
    from hydra import compose

    probe = command if command.config else Command("train", "", "", command.schema, "config")
    with hydra_app(probe) as config_name:
        return compose(config_name=config_name, return_hydra_config=True)


def _group_line(group: str, choices: list[str], defaults) -> str:
    default = str(defaults.hydra.runtime.choices.get(group))
    shown = [f"{c} (default)" if c == default else c for c in choices]
    return f"  {group:<12} " + ", ".join(shown)


def _key_lines(keys: list[KeyDoc]) -> list[str]:
    names = [key.key.split(".", 1)[-1] for key in keys]
    name_width, type_width = max(map(len, names)), max(len(key.type) for key in keys)
    lines, section = [], ""
    for name, key in zip(names, keys, strict=True):
        head = key.key.split(".")[0] if "." in key.key else "top level"
        if head != section:
            section = head
            lines.append(f"  {head}:")
        summary = key.doc.splitlines()[0] if key.doc else ""
        lines.append(f"    {name:<{name_width}}  {key.type:<{type_width}}  {key.default:<12}  {summary}")
    if any(key.type == "Schedule" for key in keys):
        lines += ["", SCHEDULE_NOTE]
    return lines


SCHEDULE_NOTE = (
    "  Schedule: a value over training, {values: [v0, v1, ...], at: [fractions of train.steps], "
    "interp: step|linear|cosine}\n  (one value: constant), e.g. "
    "curriculum.t_max={values:[0.3,1.0],at:[0,0.5]}"
)
