"""CLI sub-commands, one module per stage; each exposes ``register(app)``."""

from edgefuse.commands import compose, edge, evaluate, export, federated, fusion, info, mmlu_cd, pipeline, report

COMMAND_MODULES = [info, evaluate, edge, fusion, export, mmlu_cd, pipeline, report, federated, compose]
