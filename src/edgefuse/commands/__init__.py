"""CLI sub-commands, one module per stage; each exposes ``register(app)``."""

from edgefuse.commands import edge, evaluate, fusion, info, mmlu_cd, pipeline, federated

COMMAND_MODULES = [info, evaluate, edge, fusion, mmlu_cd, pipeline, federated]
