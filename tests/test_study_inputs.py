"""The study's inputs are fixed once its data steps ran (issue 23, item 5): `Study.fix_inputs` refuses rebinding
and changing them, keeps their JSON (so every cache key stays as it was), and the walk fixes them after the data
steps and before the first evaluation."""

from __future__ import annotations

import pytest

from edgefuse.config import StudyConfig
from edgefuse.io import canonical_json
from edgefuse.runner.plan import plan_tasks, study_plan
from edgefuse.runner.study import Study
from edgefuse.runner.walk import Walk

pytestmark = pytest.mark.unit

CFG = {"edges": {"a": ["stem"], "b": ["law"]}, "benchmarks": {"mmlu_cd": {"ks": [2, 3]}}}


def _study() -> Study:
    st = Study(StudyConfig.model_validate(CFG), run_dir=None, cache=None, progress=None)
    st.mmlu_items, st.file_hashes, st.cd_hashes = ["q1", "q2"], {"f": "00"}, {2: "ab"}
    st.cd_docs = {2: {"instances": []}}
    return st


def test_fixed_inputs_refuse_changes_and_keep_their_json():
    st = _study()
    before = canonical_json({"cd": st.cd_hashes, "files": st.file_hashes, "items": st.mmlu_items})
    st.fix_inputs()
    assert canonical_json({"cd": st.cd_hashes, "files": st.file_hashes, "items": st.mmlu_items}) == before
    with pytest.raises(AttributeError, match="fixed once"):
        st.dataset = object()
    with pytest.raises(AttributeError, match="fixed once"):
        st.cd_docs = {}
    for change in (lambda: st.cd_hashes.__setitem__(3, "cd"), lambda: st.cd_docs.update({3: {}}),
                   lambda: st.file_hashes.pop("f"), lambda: st.mmlu_items.append("q3"),
                   lambda: st.tasks.extend([None])):
        with pytest.raises(TypeError, match="fixed once"):
            change()
    assert st.cd_hashes == {2: "ab"} and st.mmlu_items == ["q1", "q2"]
    st.model = "another model"  # what stages hand on stays writable
    st.missing_edges.append({"edge": "a"})


def test_the_walk_fixes_the_inputs_after_the_data_steps():
    """Each step records whether the inputs were fixed when it ran: the data and task-data steps before, every
    later one after."""
    cfg = StudyConfig.model_validate(CFG)
    specs = study_plan(cfg, plan_tasks(cfg))
    st = Study(cfg, run_dir=None, cache=None, progress=None)
    seen = []

    class Recording(Walk):
        def __getattribute__(self, name):
            if name.startswith("_") and not name.startswith("__") and name[1:] in {s.step for s in specs}:
                return lambda spec: seen.append((spec.step, st.inputs_fixed))
            return super().__getattribute__(name)

        def train(self, group):
            seen.extend(("train", st.inputs_fixed) for _ in group)

    Recording(st, trainer=None).run(specs)
    assert [step for step, _ in seen] == [s.step for s in specs]
    assert [step for step, fixed in seen if not fixed] == ["data", "task_data", "task_data"]
