"""One smoke test per command through a real ``python -m edgefuse.cli`` process: the entry point, the exit code
the shell sees, and the one ``error:`` line on the real stderr with nothing written.

Everything else about the commands is tested in-process (the ``cli`` fixture), where a call costs no Python +
torch start-up. `edgefuse run` on a whole study as a process is covered by test_pipeline_e2e.py, and
``mmlu-cd build`` under two hash seeds by test_mmlu_cd.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

pytestmark = pytest.mark.e2e

BAD_STUDY = {"model": "tiny-llama", "edges": {"a": ["stem"], "b": ["law"]},
             "fusion": {"methods": ["nope"], "cr": ["off"]}}

# (argv with {d} for the test's directory, text the one stderr line must hold); every output is {d}/out
BAD = {
    "eval mmlu": (["eval", "mmlu", "--model", "nonsense"], "unknown model spec 'nonsense'"),
    "eval mmlu-cd": (["eval", "mmlu-cd", "--bench", "{d}/missing.jsonl", "--model", "tiny-llama"],
                     "missing.jsonl: MMLU-CD benchmark file not found"),
    "mmlu-cd build": (["mmlu-cd", "build", "--k", "5", "--n", "10"], "k=5 must be between 2 and the number of domains"),
    "prune": (["prune", "--model", "tiny-llama", "--ratio", "1.5"], "--ratio must lie in (0, 1)"),
    "train": (["train", "--pruned", "{d}/missing", "--domain", "stem"], "missing: pruned model directory not found"),
    "recover": (["recover", "--package", "{d}/missing", "--plan", "{d}/missing/plan.json"],
                "missing: not an edge package"),
    "fuse": (["fuse", "--method", "nope", "--adapters", "{d}/a", "{d}/b"], "unknown fusion method 'nope'"),
    "conflicts": (["conflicts", "--adapters", "{d}/missing", "{d}/b", "--json", "{d}/out"],
                  "missing: adapter directory not found"),
    "export": (["export", "--adapter", "{d}/missing"], "missing: adapter directory not found"),
    "run": (["run", "{d}/study.yaml", "--run-dir", "{d}/out"], "unknown fusion method 'nope'"),
    "federated simulate": (["federated", "simulate", "{d}/study.yaml", "--run-dir", "{d}/out"],
                           "unknown fusion method 'nope'"),
    "compose lorahub": (["compose", "lorahub", "--domains", "stem"], "at least one adapter"),
}
NEEDS_OUT = {"eval mmlu", "eval mmlu-cd", "mmlu-cd build", "prune", "train", "recover", "fuse", "export",
             "compose lorahub"}


@pytest.fixture(scope="module")
def ran(tmp_path_factory, cli_process):
    """Every smoke command, started together (a few at a time): each process spends seconds importing Python,
    torch and transformers, and they do not depend on one another. {name: (directory, result)}."""
    def one(name: str):
        d = tmp_path_factory.mktemp(name.replace(" ", "-"))
        if name == "info":
            return d, cli_process("info")
        (d / "study.yaml").write_text(yaml.safe_dump(BAD_STUDY))
        argv, _ = BAD[name]
        argv = [a.format(d=d) for a in argv] + (["--out", str(d / "out")] if name in NEEDS_OUT else [])
        return d, cli_process(*argv)

    names = ["info", *sorted(BAD)]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(one, names)))


def test_info_runs_as_a_process(ran):
    _, r = ran["info"]
    assert r.returncode == 0, r.stderr
    assert "14042 items, 57 subjects" in r.stdout


@pytest.mark.parametrize("command", sorted(BAD))
def test_bad_input_is_one_line_on_the_real_stderr_and_nothing_written(command, ran):
    d, r = ran[command]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr  # EdgefuseError's exit code, as the shell sees it
    assert lines[0].startswith("error: ") and BAD[command][1] in lines[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["study.yaml"]  # no output, no temporary files
