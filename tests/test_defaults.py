"""Each default has one source: the edge CLI reads the schema's, and the Flower run config in pyproject.toml
holds the ServerApp's."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from edgefuse.commands import edge as edge_cmds
from edgefuse.config import StudyConfig
from edgefuse.edge.schema import PruningConfig, TrainConfig

pytestmark = pytest.mark.unit

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# option -> the schema field it sets, for every option of `edgefuse prune` / `edgefuse train` that one sets
SCHEMA_OPTIONS = {
    edge_cmds.prune_cmd: {"method": (PruningConfig, "method"), "structure": (PruningConfig, "structure"),
                          "calib": (PruningConfig, "calib"), "batch": (TrainConfig, "batch"),
                          "seq": (TrainConfig, "seq"), "rank": (TrainConfig, "rank")},
    edge_cmds.train_cmd: {name: (TrainConfig, name) for name in (
        "steps", "rank", "alpha", "lr", "batch", "seq", "grad_accum", "seed", "checkpoint_every", "grad_checkpointing")},
}


@pytest.mark.parametrize("command", list(SCHEMA_OPTIONS), ids=lambda c: c.__name__)
def test_edge_cli_defaults_and_bounds_are_the_schemas(command):
    params = inspect.signature(command).parameters
    for option, (model, field) in SCHEMA_OPTIONS[command].items():
        info, declared = params[option].default, model.model_fields[field]
        assert info.default == declared.default, option
        ge = [m.ge for m in declared.metadata if hasattr(m, "ge")]
        assert info.min == (ge[0] if ge else None), option


def test_the_study_and_the_cli_prune_with_the_same_calibration_default():
    """The CLI once defaulted to 32 calibration prompts while a study used 16; both now read `PruningConfig`."""
    study = StudyConfig.model_fields["pruning"].get_default()  # a study's `pruning` when its YAML has none
    cli = inspect.signature(edge_cmds.prune_cmd).parameters["calib"].default.default
    assert study.calib == cli == PruningConfig().calib


def test_pyproject_flower_run_config_equals_the_serverapp_defaults():
    from edgefuse.federated.serverapp import DEFAULTS

    run_config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert run_config == DEFAULTS


def test_compose_cli_and_the_study_share_the_composition_defaults():
    """``edgefuse compose lorahub`` / ``compose embed`` and a study's ``compose:`` section take their defaults from
    `edgefuse.compose.schema`."""
    import typer

    from edgefuse.commands import compose as compose_cmds
    from edgefuse.compose.schema import EmbeddingSettings, LoraHubSettings

    app = typer.Typer()
    compose_cmds.register(app)
    [group] = app.registered_groups
    cmds = {c.callback.__name__: inspect.signature(c.callback).parameters for c in group.typer_instance.registered_commands}
    lorahub = LoraHubSettings.model_fields
    for option in ("examples", "budget", "method"):
        assert cmds["lorahub"][option].default.default == lorahub[option].default, option
    assert cmds["embed"]["examples"].default.default == EmbeddingSettings.model_fields["examples"].default
    assert StudyConfig.model_fields["compose"].get_default().lorahub is None  # off unless the study names it
