"""CLI sub-commands, one module per stage; each exposes ``register(app)``."""

from edgefuse.commands import compose, edge, evaluate, export, federated, fusion, info, mmlu_cd, pipeline, report
from edgefuse.commands import interference  # grams; conflicts --activations
from edgefuse.commands import models

COMMAND_MODULES = [info, evaluate, edge, fusion, interference, export, mmlu_cd, pipeline, report, federated, compose,
                   models]
