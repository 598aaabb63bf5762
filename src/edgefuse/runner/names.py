"""The study's stage names, in one place for the stages that run (`stages`, `composition`, `interference`) and the
plan that estimates them (`estimate`).

Why: a stage's name is half of its cache identity and what the progress display and ``--dry-run`` list; the
runner and the estimator each wrote the same f-strings, so a renamed stage would have been planned under one
name and run under another. The names are those run directories already hold.
"""

from __future__ import annotations


def round_tag(seed: int, round_no: int) -> str:
    """Stage-name suffix: ``s0`` in the first round (the one-round names), ``s0-r2`` after."""
    return f"s{seed}" + (f"-r{round_no}" if round_no > 1 else "")


def cd_build(k: int) -> str:
    return f"mmlu-cd-k{k}"


def embed(edge: str) -> str:
    return f"embed-{edge}"


def edge_grams(tag: str) -> str:
    """The edges' own Gram matrices gathered into the study's Gram directory (``interference.source: edges``)."""
    return f"grams-{tag}"


def prune(edge: str, seed: int) -> str:
    return f"prune-{edge}-s{seed}"


def train(edge: str, tag: str) -> str:
    return f"train-{edge}-{tag}"


def recover(edge: str, tag: str) -> str:
    return f"recover-{edge}-{tag}"


def eval_edge(edge: str, tag: str) -> str:
    return f"eval-edge-{edge}-{tag}"


def fuse(model: str, tag: str) -> str:
    return f"fuse-{model}-{tag}"


def interference(model: str, tag: str) -> str:
    return f"interference-{model}-{tag}"


def evaluation(model: str, tag: str) -> str:
    """The evaluation of a fused or composed model (``eval-base`` is the base model's)."""
    return f"eval-{model}-{tag}"


def composed(name: str, tag: str) -> str:
    """A composition's own stage (LoraHub's search and fusion)."""
    return f"{name}-{tag}"


def mixture_mmlu(retrieval_tag: str, tag: str) -> str:
    """A retrieval mixture's MMLU evaluation, shared by the mixtures whose requests mix alike."""
    return f"eval-{retrieval_tag}-mmlu-{tag}"


def mixture_task(retrieval_tag: str, task: str, tag: str) -> str:
    """A retrieval mixture's evaluation on a configured task (`edgefuse.tasks`), shared as MMLU's is."""
    return f"eval-{retrieval_tag}-{task}-{tag}"


def mixture_cd(name: str, tag: str) -> str:
    return f"eval-{name}-cd-{tag}"


DATA = "data"
BASE_EVAL = "eval-base"
GRAMS = "grams"  # the base model's Gram matrices on the public split, once per study
