"""Key descriptions from the schemas' field comments, and the check of overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from parallel.topology import ConfigError
from pretrain import cli
from pretrain.confdoc import check_overrides, field_docs, is_schema, schema_fields, type_name


@dataclass
class Documented:
    plain: int = 1  # a trailing comment
    # a block above,
    # two lines long
    above: str = "x"
    wrapped: str = "long"  # a comment inside the statement
    undocumented: float = 0.0

    # a comment after a blank line belongs to nothing above
    nested: list[int] = field(default_factory=list)


def test_field_docs_reads_trailing_and_above_comments():
    docs = field_docs(Documented)
    assert docs["plain"] == "a trailing comment"
    assert docs["above"] == "a block above,\ntwo lines long"
    assert docs["wrapped"] == "a comment inside the statement"
    assert docs["undocumented"] == ""
    assert docs["nested"] == "a comment after a blank line belongs to nothing above"


def test_type_names_drop_module_paths():
    hints = schema_fields(cli.function("pretrain.config:DataConfig"))
    assert type_name(hints["sources"]) == "list[SourceConfig]"
    assert type_name(hints["max_bytes"]) == "int | None"
    assert type_name(hints["seq_len"]) == "int"


def schemas_of(schema: type) -> list[type]:
    found = [schema]
    for hint in schema_fields(schema).values():
        if is_schema(hint):
            found += schemas_of(hint)
    return found


@pytest.mark.parametrize("name", [n for n, c in cli.COMMANDS.items() if c.schema])
def test_every_key_of_every_command_has_a_description(name):
    """--help takes each key's description from its field comment: none may be missing."""
    for schema in schemas_of(cli.function(cli.COMMANDS[name].schema)):
        missing = [key for key, doc in field_docs(schema).items() if not doc.strip()]
        assert missing == [], f"{schema.__name__}: {missing}"


OPTIONS = {"model": ["small", "tiny"], "curriculum": ["constant", "llada"], "experiment": ["stdlib_cpu"]}


def check(*overrides: str, extra=()) -> None:
    check_overrides(list(overrides), cli.function("pretrain.config:Config"), OPTIONS, extra)


def test_valid_overrides_pass():
    check(
        "train.steps=3", "model=tiny", "curriculum=constant,llada", "model.hidden_size=8", "experiment=null"
    )
    check("curriculum.t_min.values=[0.1]", "data.sources=[{path: x}]", "~model.vocab_size")
    check(
        "hydra.sweep.dir=x",
        "hydra/launcher=joblib",
        "+hydra.job.env_set.A=1",
        "checkpoint=run",
        extra=["checkpoint"],
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "`train.stepz`: no such key; did you mean `train.steps`?"),
        (
            "model=tinny",
            "`model=tinny`: no such option in conf/model/ (small, tiny); did you mean `model=tiny`?",
        ),
        ("curriculum=constant,lada", "did you mean `curriculum=llada`?"),
        ("+train.stepz=3", "did you mean `train.steps`?"),
        ("zzz=1", "`zzz`: no such key"),
        ("checkpoint=run", "`checkpoint` is a section: set its keys (checkpoint.every,"),
    ],
)
def test_invalid_overrides_name_the_closest(override, message):
    with pytest.raises(ConfigError) as error:
        check(override)
    assert message in str(error.value)
