"""CLI sub-commands, one module per stage; each exposes ``register(app)``."""

from edgefuse.commands import compose, edge, evaluate, export, fusion, info, mmlu_cd, pipeline, federated

COMMAND_MODULES = [info, evaluate, edge, fusion, export, mmlu_cd, pipeline, federated, compose]
