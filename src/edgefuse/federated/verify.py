"""Check an uploaded edge package before the cloud accepts it: hashes, identity, tensors, shapes.

Why: in a federation the cloud cannot trust what arrives. A package is fused only when
- every file hashes to what its manifest says (and the manifest lists exactly the package files),
- it was trained for this base model (fingerprint), on this edge's pruning plan (plan hash), on the
  pruned model the cloud built from that plan (pruned fingerprint), for this edge and with this rank,
- every LoRA tensor is finite and has the shape the plan gives its module, and every module the
  training targets is present; a retrieval vector, if the manifest carries one, is well-formed.
Any failure raises `PackageRejected` with the reason; the package is then left out and reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefuse.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, load_adapter, verify_hashes
from edgefuse.artifacts import PACKAGE_KIND, EdgePackageManifest, parse_manifest
from edgefuse.compose.embedding import read_embedding
from edgefuse.edge.families import family_of, resolve_targets
from edgefuse.edge.plan import kept_shape, plan_hash
from edgefuse.errors import EdgefuseError
from edgefuse.io import read_json


class PackageRejected(EdgefuseError):
    """An edge's upload failed a check; the message is the reason shown in the report."""


def expected_shapes(plan: dict[str, Any], targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every module of the pruned model that training adapts, keyed by pruned module name."""
    base = plan["base_config"]
    adapted = set(resolve_targets(family_of(base), targets))
    out = {}
    for entry in plan["modules"].values():
        proj = entry["pruned_name"].rsplit(".", 1)[-1]
        if proj in adapted:
            out[entry["pruned_name"]] = kept_shape(base, entry, proj)
    return out


def verify_package(package_dir: Path, *, edge: str, plan: dict[str, Any], base_fingerprint: str,
                   pruned_fingerprint: str | None, rank: int, targets: list[str],
                   start_sha256: str | None = None) -> EdgePackageManifest:
    """Return the manifest of a package that passes every check; raise `PackageRejected` otherwise.

    ``start_sha256``: the start adapter the cloud sent for this round (None in the first round); the
    package must say it started from exactly that one.
    """
    package_dir = Path(package_dir)
    try:
        man = read_json(package_dir / MANIFEST_FILE)
        if not isinstance(man, dict):
            raise PackageRejected("manifest is not a JSON object")
        listed = sorted(man.get("files") or {})
        absent = sorted(set(map(str, listed)) - {p.name for p in package_dir.iterdir()})
        if absent:
            raise PackageRejected(f"manifest lists {', '.join(absent)}, which the package does not hold")
        if listed != sorted([CONFIG_FILE, WEIGHTS_FILE]):
            raise PackageRejected(f"manifest lists files {listed}, expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            verify_hashes(package_dir)
        except EdgefuseError as e:
            raise PackageRejected(f"hash check failed: {Path(str(e).split(':', 1)[0]).name} "
                                  f"{str(e).split(': ', 1)[-1]}") from None
        try:
            man = parse_manifest(man, package_dir / MANIFEST_FILE)
        except EdgefuseError as e:
            raise PackageRejected(str(e).split(": ", 1)[-1]) from None
        if type(man) is not EdgePackageManifest:
            raise PackageRejected(f"kind is {man.kind!r}, expected {PACKAGE_KIND!r}")
        checks = [("base fingerprint", man.base_fingerprint, base_fingerprint),
                  ("plan hash", man.plan_hash, plan_hash(plan)), ("edge", man.domain, edge),
                  ("rank", man.train.get("rank"), rank),
                  ("start adapter", (man.init or {}).get("sha256"), start_sha256)]
        if pruned_fingerprint:
            checks.append(("pruned-model fingerprint", man.pruned_fingerprint, pruned_fingerprint))
        for what, got, want in checks:
            if got != want:
                raise PackageRejected(f"{what} is {got!r}, expected {want!r}")
        if man.embedding is not None:  # the edge's retrieval vector (retrieval mixtures): well-formed or rejected

            read_embedding(man, package_dir)
        adapter = load_adapter(package_dir)  # the one reader: header, ranks, NaN/Inf; the plan is checked below
        want_shapes = expected_shapes(plan, targets)
        got_names, want_names = set(adapter.modules), set(want_shapes)
        if got_names != want_names:
            extra, missing = sorted(got_names - want_names), sorted(want_names - got_names)
            raise PackageRejected(f"adapted modules differ from the plan (unexpected {extra[:3]}, missing {missing[:3]})")
        for name, mod in adapter.modules.items():
            if mod.shape != want_shapes[name] or mod.rank != rank:
                raise PackageRejected(f"module {name} is {mod.shape[0]}×{mod.shape[1]} rank {mod.rank}, the plan "
                                      f"gives {want_shapes[name][0]}×{want_shapes[name][1]} rank {rank}")
        return man
    except PackageRejected:
        raise
    except EdgefuseError as e:
        raise PackageRejected(str(e).replace(str(package_dir) + "/", "")) from None

