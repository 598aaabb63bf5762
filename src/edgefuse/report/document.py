"""The study report written into a run directory: ``report.md``, ``results.csv``, PNG figures, ``results.json``.

A pure function of the results document: `edgefuse report RUN_DIR` re-renders any run's report from its
``results.json`` alone, without the stage directories, adapters or model.
"""

from __future__ import annotations

from pathlib import Path

from edgefuse.errors import EdgefuseError
from edgefuse.evaluate.stats import fmt_ci
from edgefuse.artifacts import StudyResults
from edgefuse.io import atomic_write_text, jsonable
from edgefuse.report.figures import draw_figures
from edgefuse.report.gold import RETENTION_NOTE, gold_note, gold_table, prediction_line, retention_table
from edgefuse.report.tables import (EDGES_NOTE, cd_answer_table, cd_ks, composed_line, conflict_table,
                                    cr_sweep_table, edges_table, headline_rows, headline_table, interference_note,
                                    interference_table, results_csv,
                                    retrieval_line, rounds_table, scoring_line, seeds_table, stages_table,
                                    transfer_table)


def read_results(run_dir: Path) -> dict:
    """A run directory's ``results.json``, checked by its model (`edgefuse.artifacts.StudyResults`), as JSON."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise EdgefuseError("no results.json here (the study has not finished, or this is not a run directory)",
                            path=path)
    return StudyResults.read(path).dump()


def write_report(doc: dict, run_dir: Path, results: bool = True) -> list[str]:
    """Write ``report.md``, ``results.csv`` and the figures into ``run_dir``, and (``results``) ``results.json``
    last, so that a results.json means the whole report was written. Returns one note per figure left out.

    ``doc`` is checked by the results model first and rendered in its JSON form, the form `read_results`
    gives back, so a fresh report and a re-rendered one are made from identical input."""
    run_dir = Path(run_dir)
    checked = StudyResults.parse(jsonable(doc), run_dir / "results.json")
    doc = checked.dump()
    figures, notes = draw_figures(doc, run_dir) if doc["config"]["output"]["figures"] else ({}, [])
    ks = cd_ks(doc)
    md = [f"# edgefuse study: {doc['name']}", "",
          f"Model `{doc['model']}` (fingerprint `{doc['base_fingerprint']}`); {len(doc['config']['edges'])} edges; "
          f"seeds {doc['config']['seeds']}; MMLU items: {doc['mmlu_n']}; MMLU-CD instances: "
          + ", ".join(f"k={k}: {n}" for k, n in doc["cd_n"].items()) + f"; total wall time {doc['wall_s']:.0f} s.", "",
          "Accuracies in %, with 95% bootstrap intervals. Δ columns are paired bootstrap intervals over the same "
          "items; `*` marks a difference whose interval excludes 0.", "",
          "## Headline: base model vs fused edge adapters (± LoRA-CR)"
          + (" and their dynamic compositions" if any(s.get("composed") for s in doc["seeds"]) else ""),
          "", scoring_line(doc), "", headline_table(doc), ""]
    md += [line + "\n" for line in (composed_line(doc), retrieval_line(doc)) if line]
    gold = gold_table(doc, headline_rows(doc))
    if gold:
        md += ["### Gold answer log-likelihood", "", gold_note(doc), "", gold, ""]
    answers = cd_answer_table(doc)
    if answers:
        md += [answers, ""]
    for k in ks:
        b = doc["base"].get(f"mmlu_cd_k{k}", {})
        if b:
            md.append(f"MMLU-CD k={k}: chance {100 * b.get('chance', 0.25 ** k):.2f}%; base single-item accuracy on the "
                      f"same items {fmt_ci(b['single']) if isinstance(b.get('single'), dict) else '–'}.")
    md += ["", "## Edges", "", edges_table(doc), "", EDGES_NOTE, ""]
    if doc.get("missing_edges"):
        md += ["## Missing edges", "", "Left out of fusion and evaluation (federated run: the edge failed, timed out "
               "or its package was rejected).", "", "| edge | seed | round | reason |", "|---|---:|---:|---|"]
        md += [f"| {m['edge']} | {m['seed']} | {m.get('round', 1)} | {' '.join(str(m['reason']).replace('|', '/').split())} |"
               for m in doc["missing_edges"]]
        md.append("")
    if len(doc["seeds"][0].get("rounds", [])) > 1:
        md += ["## Accuracy per round", "", "Each round after the first starts every edge from the fused model "
               "marked *sent back* (`rounds.method`/`rounds.cr`), projected to the edge's pruned shapes. The tables "
               "above show the last round.", "", rounds_table(doc), ""]
    if len(doc["seeds"]) > 1:
        md += ["## Across seeds", "", seeds_table(doc), ""]
    transfer = transfer_table(doc)
    if transfer:
        md += ["## Transfer matrix: each edge alone, per domain", "",
               "Paired Δ (points) of each edge's recovered adapter alone against the base model on the test items of "
               "each edge's domain; the diagonal (bold) is the own-domain gain, the rest cross-domain interference.",
               "", transfer, ""]
    kept = retention_table(doc)
    if kept:
        md += ["## Retention: each domain's gain under fusion", "", RETENTION_NOTE, "", kept, ""]
    md += ["## Conflict statistics (LoRA-CR)", "", conflict_table(doc), ""]
    inter = interference_table(doc)
    if inter:
        md += ["## Interference on activations", "", interference_note(doc), "", inter, ""]
        predicts = prediction_line(doc)
        if predicts:
            md += [predicts, ""]
    sweep = cr_sweep_table(doc)
    if sweep:
        md += ["## LoRA-CR against the same method without it", "",
               "Paired Δ of each LoRA-CR setting against its method with LoRA-CR off, with the share of adapter "
               "parameters LoRA-CR changed.", "", sweep, ""]
    if figures or notes:
        md += ["## Figures", ""] + [f"![{cap}]({name})\n\n*{cap}*\n" for name, cap in figures.items()]
        md += [f"*{note}*\n" for note in notes]
    md += ["## Stage wall times", "", stages_table(doc), ""]
    atomic_write_text(run_dir / "results.csv", results_csv(doc))
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    if results:
        checked.write(run_dir / "results.json")  # last: a results.json means the whole report was written
    return notes
