"""MMLU-CD builder: compose k test items from k distinct domains into one cross-domain instance.

Why: single-domain accuracy hides whether a (fused) model can solve a problem that needs several
domains at once. An MMLU-CD instance asks k questions from k different domains in one prompt (see
``docs/mmlu_cd.md``). The builder is deterministic (string-seeded RNGs, content-derived item ids),
balances domain combinations and answer positions, and writes a canonical JSONL whose sha256 is the
benchmark's content hash, so anyone can rebuild or check the exact set.

File layout (JSONL, one JSON object per line, keys sorted, no extra whitespace):
line 1 is the header ``{"format": "edgefuse-mmlu-cd", "schema_version": 1, "split", "split_seed",
"split_spec", "seed", "k", "n", "domains", "no_reuse", "combinations", "pool_sha256"}``; each
following line is one instance ``{"id", "items", "domains", "subjects"}`` with the item ids in answer
order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from edgefuse.data.mmlu import SPLITS, MMLUDataset, MMLUItem, SplitSpec, make_splits
from edgefuse.data.taxonomy import CATEGORIES, domain_subjects, normalise_subject
from edgefuse.errors import EdgefuseError
from edgefuse.io import atomic_write_text, canonical_json, jsonl_rows

FORMAT = "edgefuse-mmlu-cd"
SCHEMA_VERSION = 1
MAX_COMBINATIONS = 200_000
_HEADER_KEYS = ("format", "schema_version", "split", "split_seed", "seed", "k", "n", "domains")
_INSTANCE_KEYS = ("id", "items", "domains")


def _check_domains(domains: Sequence[str] | None, k: int) -> tuple[list[str], dict[str, set[str]]]:
    """Normalised domain names and their subject sets; domains must be distinct and disjoint."""
    names = [normalise_subject(d) for d in (domains or CATEGORIES)]
    if len(set(names)) != len(names):
        raise EdgefuseError(f"domains listed twice: {', '.join(sorted({d for d in names if names.count(d) > 1}))}")
    subjects = {d: set(domain_subjects(d)) for d in names}  # raises on unknown names
    for a, b in itertools.combinations(names, 2):
        shared = subjects[a] & subjects[b]
        if shared:
            raise EdgefuseError(f"domains {a!r} and {b!r} overlap (both contain {min(shared)!r}); "
                                "MMLU-CD needs disjoint domains")
    if not 2 <= k <= len(names):
        raise EdgefuseError(f"k={k} must be between 2 and the number of domains ({len(names)}: {', '.join(names)})")
    n_comb = math.comb(len(names), k)
    if n_comb > MAX_COMBINATIONS:
        raise EdgefuseError(f"{n_comb} domain combinations for k={k} of {len(names)} domains; "
                            f"at most {MAX_COMBINATIONS} are supported (use fewer domains or another k)")
    return names, subjects


def _pools(dataset: MMLUDataset, split: str, spec: SplitSpec, names, subjects) -> dict[str, list[MMLUItem]]:
    """Items of the split per domain, in id order."""
    if split not in SPLITS and split != "all":
        raise EdgefuseError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
    keep = None if split == "all" else set(make_splits(dataset, spec)[split])
    pools = {d: sorted((it for it in dataset.items if it.subject in subjects[d] and (keep is None or it.id in keep)),
                       key=lambda it: it.id) for d in names}
    for d, pool in pools.items():
        if not pool:
            raise EdgefuseError(f"domain {d!r} has no items in the {split!r} split of {dataset.source}")
    return pools


def _allocation(n: int, combos: list[tuple[str, ...]], seed: int) -> list[int]:
    """Instances per combination: n // C each, the n % C extras go to the first combos of a seeded order.

    The seeded order does not depend on n, so each domain's demand grows monotonically with n (the
    no-reuse maximum can be found by bisection).
    """
    order = list(range(len(combos)))
    random.Random(f"edgefuse-mmlu-cd:{seed}:combos").shuffle(order)
    q, r = divmod(n, len(combos))
    counts = [q] * len(combos)
    for c in order[:r]:
        counts[c] += 1
    return counts


def _demand(n: int, combos, seed: int, names) -> dict[str, int]:
    need = dict.fromkeys(names, 0)
    for combo, count in zip(combos, _allocation(n, combos, seed)):
        for d in combo:
            need[d] += count
    return need


def max_instances_without_reuse(pools: dict[str, list], combos, seed: int) -> int:
    """Largest n whose balanced allocation needs no more items of any domain than its pool holds."""
    def fits(n: int) -> bool:
        return all(need <= len(pools[d]) for d, need in _demand(n, combos, seed, list(pools)).items())

    lo, hi = 0, sum(len(p) for p in pools.values()) + 1  # fits(lo) holds, fits(hi) cannot
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class _Stream:
    """Seeded draws without replacement from one domain's pool; reshuffles when exhausted (reuse)."""

    def __init__(self, pool: list[MMLUItem], seed: int, domain: str):
        self.pool, self.seed, self.domain = pool, seed, domain
        self.epoch, self.queue = -1, []

    def next(self) -> MMLUItem:
        if not self.queue:
            self.epoch += 1
            self.queue = list(self.pool)
            random.Random(f"edgefuse-mmlu-cd:{self.seed}:{self.domain}:{self.epoch}").shuffle(self.queue)
            self.queue.reverse()  # pop() from the end = take in shuffled order
        return self.queue.pop()


def build_instances(dataset: MMLUDataset, *, k: int = 2, n: int, seed: int = 0, domains: list[str] | None = None,
                    split: str = "test", no_reuse: bool = False, split_spec: SplitSpec | None = None) -> dict:
    """The benchmark document ``{"header": {...}, "instances": [...]}``.

    Balance: every k-combination of domains gets ⌊n/C⌋ or ⌈n/C⌉ instances; within a combination the
    answer order rotates through a seeded base order, so each domain takes each position equally
    often (±1). Items are drawn per domain without replacement until the pool is exhausted; with
    ``no_reuse`` that is an error stating the largest feasible n. Domains are disjoint, so an
    instance never holds the same item twice.
    """
    names, subjects = _check_domains(domains, k)
    spec = split_spec or SplitSpec()
    pools = _pools(dataset, split, spec, names, subjects)
    instances, combos, counts = compose_instances(pools, k=k, n=n, seed=seed, no_reuse=no_reuse,
                                                  where=f"the {split!r} split")
    pool_digest = hashlib.sha256(canonical_json({d: [it.id for it in pools[d]] for d in names}).encode()).hexdigest()
    header = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "split": split, "split_seed": spec.seed,
        "split_spec": asdict(spec), "seed": seed, "k": k, "n": n, "domains": names, "no_reuse": no_reuse,
        "combinations": {"+".join(c): cnt for c, cnt in zip(combos, counts)}, "pool_sha256": pool_digest,
    }
    return {"header": header, "instances": instances}


def compose_instances(pools: dict[str, list], *, k: int, n: int, seed: int = 0, no_reuse: bool = False,
                      where: str = "the pool") -> tuple[list[dict], list[tuple[str, ...]], list[int]]:
    """n cross-domain instances of k questions from k distinct domains of ``pools`` (domain → its items, each
    item in one domain only, in a fixed order): (instances, domain combinations, instances per combination).

    This is MMLU-CD's composer for any multiple-choice domains (`edgefuse.data.choices` items as well as MMLU's):
    every k-combination of domains gets ⌊n/C⌋ or ⌈n/C⌉ instances; within a combination the answer order rotates
    through a seeded base order, so each domain takes each position equally often (±1). Items are drawn per
    domain without replacement until the pool is exhausted, then reshuffled; with ``no_reuse`` that is an error
    stating the largest feasible n."""
    names = list(pools)
    if n < 1:
        raise EdgefuseError(f"n={n}: the number of instances must be at least 1")
    if not 2 <= k <= len(names):
        raise EdgefuseError(f"k={k} must be between 2 and the number of domains ({len(names)}: {', '.join(names)})")
    empty = [d for d in names if not pools[d]]
    if empty:
        raise EdgefuseError(f"domain {empty[0]!r} has no items in {where}")
    combos = list(itertools.combinations(names, k))
    if no_reuse:
        need = _demand(n, combos, seed, names)
        short = [d for d in names if need[d] > len(pools[d])]
        if short:
            m = max_instances_without_reuse(pools, combos, seed)
            d = short[0]
            raise EdgefuseError(
                f"--no-reuse: n={n} needs {need[d]} {d!r} items but {where} has {len(pools[d])}; "
                f"the maximum without reuse for k={k}, seed={seed} and these domains is n={m}")
    counts = _allocation(n, combos, seed)
    slots: list[tuple[str, ...]] = []
    for ci, (combo, count) in enumerate(zip(combos, counts)):
        base = list(combo)
        random.Random(f"edgefuse-mmlu-cd:{seed}:order:{ci}").shuffle(base)
        for t in range(count):
            s = t % k
            slots.append(tuple(base[s:] + base[:s]))
    random.Random(f"edgefuse-mmlu-cd:{seed}:instances").shuffle(slots)
    streams = {d: _Stream(pools[d], seed, d) for d in names}
    instances = []
    for i, order in enumerate(slots):
        items = [streams[d].next() for d in order]
        instances.append({"id": f"cd-{i:06d}", "items": [it.id for it in items], "domains": list(order),
                          "subjects": [it.subject for it in items]})
    return instances, combos, counts


def serialize(doc: dict) -> str:
    """Canonical JSONL text: header line, then one instance per line (sorted keys, compact)."""
    return "".join(canonical_json(rec) + "\n" for rec in [doc["header"], *doc["instances"]])


def content_hash(doc: dict) -> str:
    """sha256 of the canonical JSONL; equals ``sha256sum`` of a file written by `write_benchmark`."""
    return hashlib.sha256(serialize(doc).encode("utf-8")).hexdigest()


def write_benchmark(doc: dict, path: str | Path) -> str:
    """Write the benchmark atomically (temp file + rename); return its content hash."""
    text = serialize(doc)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _require(rec: dict, keys, path, line: int, what: str) -> None:
    missing = [key for key in keys if key not in rec]
    if missing:
        raise EdgefuseError(f"{what} lacks field(s) {', '.join(missing)}", path=path, line=line)


def load_benchmark(path: str | Path) -> dict:
    """Read and validate an MMLU-CD file; any problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EdgefuseError("MMLU-CD benchmark file not found", path=path)
    records = []
    for no, rec in jsonl_rows(path):
        if not isinstance(rec, dict):
            raise EdgefuseError("expected a JSON object", path=path, line=no)
        records.append((no, rec))
    if not records:
        raise EdgefuseError("empty MMLU-CD file (no header line)", path=path)
    no, header = records[0]
    if header.get("format") != FORMAT:
        raise EdgefuseError(f"not an MMLU-CD header (format {header.get('format')!r}, expected {FORMAT!r})",
                            path=path, line=no)
    if header.get("schema_version") != SCHEMA_VERSION:
        raise EdgefuseError(f"unsupported schema_version {header.get('schema_version')!r} "
                            f"(this edgefuse reads version {SCHEMA_VERSION})", path=path, line=no)
    _require(header, _HEADER_KEYS, path, no, "header")
    k = header["k"]
    if not isinstance(k, int) or k < 2:
        raise EdgefuseError(f"header k={k!r} must be an integer >= 2", path=path, line=no)
    instances = []
    for no, rec in records[1:]:
        _require(rec, _INSTANCE_KEYS, path, no, "instance")
        items, doms = rec["items"], rec["domains"]
        if not (isinstance(items, list) and all(isinstance(x, str) for x in items) and len(items) == k):
            raise EdgefuseError(f"instance {rec['id']!r}: 'items' must be a list of {k} item ids", path=path, line=no)
        if len(set(items)) != k:
            raise EdgefuseError(f"instance {rec['id']!r} holds the same item twice", path=path, line=no)
        if not (isinstance(doms, list) and len(doms) == k and len(set(doms)) == k):
            raise EdgefuseError(f"instance {rec['id']!r}: 'domains' must list {k} distinct domains",
                                path=path, line=no)
        unknown = [d for d in doms if d not in header["domains"]]
        if unknown:
            raise EdgefuseError(f"instance {rec['id']!r}: domain {unknown[0]!r} is not in the header's domains",
                                path=path, line=no)
        instances.append(rec)
    if len(instances) != header["n"]:
        raise EdgefuseError(f"header says n={header['n']} but the file holds {len(instances)} instances", path=path)
    return {"header": header, "instances": instances}
