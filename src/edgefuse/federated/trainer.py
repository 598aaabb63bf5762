"""The cloud's side of edge training over Flower: one round of messages, checked packages back.

`FlowerTrainer` is a `edgefuse.runner.Trainer` for `edgefuse.runner.run_study`: it maps SuperNodes to edges
(``query.identify``), sends every pending `TrainJob` to its edge at once (the edges train in
parallel), writes each reply into the job's package directory only after `verify_package` accepts it,
and marks a failed, timed-out or rejected edge on ``job.failure`` so the study leaves it out and the
report names it, as long as at least ``min_edges`` edges delivered (0 = every edge must).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from typing import Any

from edgefuse.data.taxonomy import is_domain
from edgefuse.errors import EdgefuseError, WriteError
from edgefuse.edge.plan import is_masked, load_pruned, read_model_meta, read_plan, weight_masks
from edgefuse.federated.records import (
    IDENTITY_RECORD,
    MSG_IDENTIFY,
    MSG_TRAIN,
    content_to_files,
    content_to_grams,
    job_to_content,
)
from edgefuse.federated.verify import verify_package
from edgefuse.interference.collect import gram_layout, manifest_fields
from edgefuse.io import sha256_file

log = logging.getLogger("edgefuse.run")


class FlowerTrainer:
    parallel = True  # every pending edge of a round in one message round: the edges train at the same time

    def __init__(self, grid, min_edges: int = 0, timeout: float | None = None, wait_nodes: float = 120.0):
        self.grid = grid
        self.min_edges = int(min_edges)
        self.timeout = timeout or None
        self.wait_nodes = float(wait_nodes)
        self.node_of: dict[str, int] = {}
        self.identity: dict[str, dict[str, Any]] = {}
        self.conflicts: dict[str, str] = {}  # edge → why it has no node (several nodes claim it)
        self.rounds: list[dict[str, Any]] = []
        self._layout = None  # the base model's Gram layout, what edges' Gram uploads are checked against

    # ------------------------------------------------------------------ nodes
    def discover(self, edges: list[str]) -> dict[str, int]:
        """Which SuperNode is which edge: ask every connected node for its node-config identity."""
        from flwr.app import Message, RecordDict

        deadline = time.monotonic() + self.wait_nodes
        node_ids: list[int] = []
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= len(edges) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        msgs = [Message(RecordDict(), dst_node_id=nid, message_type=MSG_IDENTIFY, group_id="identify")
                for nid in node_ids]
        replies = list(self.grid.send_and_receive(msgs, timeout=max(30.0, self.wait_nodes))) if msgs else []
        claims: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for r in replies:
            if r.has_error() or IDENTITY_RECORD not in r.content.config_records:
                continue
            ident = dict(r.content.config_records[IDENTITY_RECORD])
            name = ident.get("edge")
            if name is None and "partition-id" in ident and int(ident["partition-id"]) < len(edges):
                name = edges[int(ident["partition-id"])]  # simulation: one virtual node per edge, in config order
            if name in edges:
                claims.setdefault(name, []).append((r.metadata.src_node_id, ident))
        # an edge two nodes claim is left out: the cloud cannot tell which one holds that edge's data
        self.conflicts = {name: f"{len(c)} SuperNodes claim this edge (node ids {', '.join(str(n) for n, _ in c)}); "
                                "give each node a distinct edge= node config"
                          for name, c in claims.items() if len(c) > 1}
        for name, why in self.conflicts.items():
            log.warning("federation: edge %s: %s", name, why)
        self.node_of = {name: c[0][0] for name, c in claims.items() if len(c) == 1}
        self.identity = {name: c[0][1] for name, c in claims.items() if len(c) == 1}
        log.info("federation: %d nodes connected, edges mapped: %s", len(node_ids), self.node_of)
        return self.node_of

    def check(self, cfg) -> None:
        """A Flower edge reads its own MMLU-format data (node config ``data``), not the cloud's ``data.choices``
        files: a study whose edges train on such a domain is refused before the federation is waited for."""
        for edge, domains in cfg.edges.items():
            files = [d for d in domains if not is_domain(d)]  # the config admits no other kind
            if files:
                raise EdgefuseError(f"edge {edge}: domain {files[0]!r} comes from data.choices; edges on such domains "
                                    f"train in the process (edgefuse run), not yet on Flower")

    def device_budgets(self, edges: list[str]) -> dict[str, float]:
        """Memory budgets (GiB) the edge devices report in their node config (``memory-budget-gib``): the
        device knows what it can hold, so the cloud prunes that edge's model to fit it (`run_study` applies
        them unless the study config sets the edge's pruning itself)."""
        if not self.node_of:
            self.discover(edges)
        out: dict[str, float] = {}
        for edge, ident in self.identity.items():
            if "memory-budget-gib" not in ident:
                continue
            raw = ident["memory-budget-gib"]
            try:
                gib = float(raw)
            except (TypeError, ValueError):
                gib = math.nan
            if not (math.isfinite(gib) and gib > 0):
                raise EdgefuseError(f"edge {edge} (node {self.node_of[edge]}) reports memory-budget-gib={raw!r}; "
                                    "expected a positive number of GiB")
            out[edge] = gib
        return out

    # ------------------------------------------------------------------ round
    def job_message(self, st, job) -> dict[str, Any]:
        """Everything the edge needs and nothing of the data: plan, model reference, settings."""
        meta = read_model_meta(job.pruned_dir)
        d = st.cfg.data
        return {"edge": job.edge, "seed": job.seed, "round": job.round_no, "domains": list(job.domains),
                "model": st.cfg.model,
                "base_fingerprint": st.base_fingerprint, "plan": read_plan(job.pruned_dir),
                "pruned_fingerprint": meta.pruned_fingerprint if meta else "", "train": job.config.model_dump(),
                "split": {"seed": d.split_seed, "public_per_subject": d.public_per_subject,
                          "edge_fraction": d.edge_fraction},
                # the edge rebuilds the pruned model in the study's dtype (its fingerprint is that model's)
                **({"dtype": st.precision.dtype} if st.precision.reduced else {}),
                # retrieval mixtures: the edge embeds its own examples and sends the vector in its manifest
                **({"embedding": st.cfg.compose.embedding.model_dump()} if st.cfg.compose.retrieval_mixture else {}),
                # interference.source: edges: the edge sends its own Gram matrices (first round)
                **({"grams": {"tokens": job.grams.tokens, "per_prompt": job.grams.per_prompt}}
                   if job.grams is not None else {})}

    @staticmethod
    def masks(job) -> dict | None:
        """Weight masks of an unstructured / 2:4 pruned model (its plan cannot list them); None otherwise."""
        plan = read_plan(job.pruned_dir)
        if not is_masked(plan):
            return None
        model, _, _ = load_pruned(job.pruned_dir)
        return weight_masks(model)

    def train(self, st, jobs: list) -> None:
        from flwr.app import Message

        edges = list(st.cfg.edges)
        if not self.node_of or any(j.edge not in self.node_of for j in jobs):
            self.discover(edges)
        msgs, sent = [], []
        for job in jobs:
            nid = self.node_of.get(job.edge)
            if nid is None:
                job.failure = self.conflicts.get(job.edge, "no SuperNode with this edge name is connected")
                continue
            sent.append(job)
            msgs.append(Message(job_to_content(self.job_message(st, job), job.init_dir, self.masks(job)),
                                dst_node_id=nid, message_type=MSG_TRAIN, group_id=f"train-s{job.seed}-r{job.round_no}"))
        t0 = time.perf_counter()
        log.info("federation: sending %d training jobs (timeout %s)", len(msgs), self.timeout)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout)) if msgs else []
        # by the id the grid gave each message: the SuperLink's own error reply for a node that vanished
        # mid-round comes from the SuperLink, not from that node
        pending = {m.metadata.message_id: job for m, job in zip(msgs, sent)}
        for r in replies:
            job = pending.pop(r.metadata.reply_to_message_id, None)
            if job is None:
                continue
            if r.has_error():
                job.failure = f"edge failed: {r.error.reason}"
                continue
            self.receive(st, job, r.content)
        for job in pending.values():
            job.failure = f"no reply within {self.timeout:g} s" if self.timeout else "no reply"
        wall = time.perf_counter() - t0
        failed = {j.edge: j.failure for j in jobs if getattr(j, "failure", None)}
        for edge, why in failed.items():
            log.warning("federation: edge %s left out: %s", edge, why)
        self.rounds.append({"seed": jobs[0].seed if jobs else None, "round": jobs[0].round_no if jobs else None,
                            "sent": len(msgs), "wall_s": round(wall, 2), "failed": failed})
        delivered = len(edges) - len(failed)
        need = self.min_edges or len(edges)
        if delivered < need:
            detail = "; ".join(f"{e}: {w}" for e, w in failed.items())
            raise EdgefuseError(f"only {delivered} of {len(edges)} edges delivered a package, min_edges is {need} "
                                f"({detail})")

    def receive(self, st, job, content) -> None:
        """Write one edge's reply into its package directory if it passes every check, else mark it rejected.

        A refused write (the cloud's own full disk) is no fault of the edge: it stops the study."""
        upload, grams = job.work_dir / ".upload", job.work_dir / ".upload-grams"
        for d in (upload, grams):
            shutil.rmtree(d, ignore_errors=True)
        try:
            content_to_files(content, upload, grams=job.grams is not None)
            if job.grams is not None:  # checked against the base model's layout before anything is kept
                self.receive_grams(st, job, content, grams)
            self.accept(st, job, upload)
            if job.grams is not None:
                shutil.rmtree(job.grams_dir, ignore_errors=True)
                os.replace(grams, job.grams_dir)
        except WriteError:
            raise
        except EdgefuseError as e:
            job.failure = f"package rejected: {e}"
        finally:
            for d in (upload, grams):
                shutil.rmtree(d, ignore_errors=True)

    def receive_grams(self, st, job, content, directory) -> None:
        """The edge's own Gram matrices (``interference.source: edges``), checked against the base model's module
        layout (one one-token forward, once per study) and written to ``directory``; raises on a bad upload."""
        if self._layout is None:
            self._layout = gram_layout(st.model)
        fields = manifest_fields(st.cfg.model, st.base_fingerprint, "edge", st.cfg.data.split_seed, job.grams.per_prompt)
        content_to_grams(content, directory, self._layout, fields, job.edge, "Gram matrices")

    def accept(self, st, job, upload) -> None:
        meta = read_model_meta(job.pruned_dir)
        start = sha256_file(job.init_dir / "adapter_model.safetensors") if job.init_dir else None
        verify_package(upload, edge=job.edge, plan=read_plan(job.pruned_dir),
                       base_fingerprint=st.base_fingerprint, pruned_fingerprint=meta.pruned_fingerprint if meta else None,
                       rank=job.config.rank, targets=list(job.config.targets), start_sha256=start)
        if job.package_dir.exists():
            shutil.rmtree(job.package_dir)
        os.replace(upload, job.package_dir)
