"""The edge role as a Flower ClientApp (``edgefuse.federated.clientapp:app``).

Two messages:
- ``query.identify``: answers with the node's identity from its node config (``edge``, optional
  ``domains``), or in simulation with its ``partition-id``, so the cloud knows which node is which edge.
- ``train``: rebuilds the pruned model from the plan, trains on the node's own partition (from the
  start adapter the message carries, in rounds after the first) and replies
  with the edge package (adapter tensors + manifest fields, see `edgefuse.federated.records`), and with the
  Gram matrices of its own prompts only when the job asks for them (``interference.source: edges``).
A failure becomes an error reply carrying the reason; the cloud then leaves this edge out.

Node config keys: ``edge`` (this node's edge name in the study), ``domains`` (optional check),
``memory-budget-gib`` (optional: the memory this device can give to training; the cloud prunes this edge's
model to fit it unless the study config sets the edge's pruning),
``data`` (MMLU source on this node, default embedded), ``model`` (local copy of the base model),
``work-dir`` (where to build and train; default a temporary directory, removed after the upload).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from edgefuse.edge.plan import full_shape
from edgefuse.federated.edge import run_job
from edgefuse.federated.records import (
    content_to_job,
    content_to_masks,
    content_to_start,
    identity_content,
    package_to_content,
)
from edgefuse.interference.spec import EDGE_GRAMS_DIR

log = logging.getLogger("edgefuse.federated")

# Error code in replies from a failed edge job (Flower reserves small codes for its own errors).
EDGE_JOB_FAILED = 1001


def handle_identify(msg: Message, context: Context) -> Message:
    return Message(identity_content(dict(context.node_config)), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    import tempfile

    try:
        job = content_to_job(msg.content)
        node = dict(context.node_config)
        if node.get("edge") and node["edge"] != job["edge"]:
            raise ValueError(f"this node is edge {node['edge']!r}, the job is for {job['edge']!r}")
        work = node.get("work-dir")
        with tempfile.TemporaryDirectory(prefix="edgefuse-start-") as sd:
            start = content_to_start(msg.content, Path(sd) / "start")
            where = Path(str(work)) / f"{job['edge']}-s{job['seed']}-r{job.get('round', 1)}" if work else None
            shapes = {n: full_shape(job["plan"]["base_config"], n.rsplit(".", 1)[-1]) for n in job["plan"]["modules"]}
            package, tmp = run_job(job, node, where, start_dir=start, masks=content_to_masks(msg.content, shapes))
        try:
            grams = package.parent / EDGE_GRAMS_DIR if job.get("grams") is not None else None
            return Message(package_to_content(package, grams), reply_to=msg)
        finally:
            if tmp is not None:
                tmp.cleanup()
    except Exception as e:
        log.exception("edge job failed")
        return Message(Error(code=EDGE_JOB_FAILED, reason=f"{type(e).__name__}: {e}"), reply_to=msg)


def make_client_app(mods=None) -> ClientApp:
    """A ClientApp with the edge handlers; ``mods`` are Flower mods wrapped around them."""
    app = ClientApp(mods=list(mods or []))
    app.query("identify")(handle_identify)
    app.train()(handle_train)
    return app


app = make_client_app()
