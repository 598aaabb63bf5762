"""`FusionRequest`: one frozen value for a fusion (issue 23, item 5), checked against the registry once, the same
fusion as the keyword form, and what a study's config hands its fuse stages."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.fusion import make_adapters

from edgefuse.config import StudyConfig
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import FusionRequest, fuse_adapters, fuse_dirs

pytestmark = pytest.mark.unit


def test_a_request_is_frozen_all_the_way_down():
    r = FusionRequest("ties", [1, 2], density=0.5, params={"majority": "frequency"})
    assert r.weights == (1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.method = "dare"
    with pytest.raises(TypeError):
        r.params["majority"] = "total"  # a read-only view: the caller's dict cannot change it either
    given = {"majority": "frequency"}
    r2 = FusionRequest("ties", params=given)
    given["majority"] = "total"
    assert r2.params["majority"] == "frequency"


@pytest.mark.parametrize("method, kw", [
    ("ties", {"density": 0.5, "seed": 3, "cr": "element", "cr_threshold": 0.0}),
    ("dare_linear", {"density": 0.7, "seed": 1, "params": {"rng": "sequential"}}),
    ("svd", {"rank": 3}),
])
def test_a_request_fuses_as_the_keyword_form(method, kw):
    """The same fusion whichever form the caller uses: the request is what the keyword form builds."""
    ads, w = make_adapters(), [0.5, 1.0, 0.8]
    params = kw.pop("params", {})
    by_request, s1 = fuse_adapters(ads, FusionRequest(method, w, params=params, **kw))
    by_keywords, s2 = fuse_adapters(ads, method, w, **kw, **params)
    assert s1["params"] == s2["params"] and s1["density"] == s2["density"]
    for name in by_keywords.modules:
        assert (by_request.modules[name].delta() - by_keywords.modules[name].delta()).abs().max() <= 1e-6


def test_settings_beside_a_request_are_refused():
    with pytest.raises(EdgefuseError, match="inside its FusionRequest"):
        fuse_adapters(make_adapters(), FusionRequest("ties"), density=0.5)


@pytest.mark.parametrize("request_, message", [
    (FusionRequest("ties", params={"majorty": "total"}), "method ties has no parameter(s) majorty"),
    (FusionRequest("cat", rank=2), "cat keeps the exact concatenated rank"),
    (FusionRequest("ties", density=1.5), "density"),
    (FusionRequest("ties", cr="elementwise"), "unknown LoRA-CR strategy 'elementwise'"),
    (FusionRequest("tie"), "unknown fusion method 'tie'"),
])
def test_check_refuses_what_the_registry_does_not_allow(request_, message):
    with pytest.raises(EdgefuseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request_.check()


def test_fuse_dirs_checks_the_request_before_reading_any_adapter(tmp_path):
    """A bad parameter is named, not the adapter directories that do not exist: nothing was read."""
    with pytest.raises(EdgefuseError, match="has no parameter"):
        fuse_dirs([tmp_path / "missing-a", tmp_path / "missing-b"], tmp_path / "out",
                  FusionRequest("ties", params={"nope": 1}))
    assert not (tmp_path / "out").exists()


def test_a_study_config_builds_each_fused_models_request():
    """`FusionConfig.request`: the shared density only where the method takes one, no shared rank for a method that
    keeps the exact concatenated rank, the method's params, and the LoRA-CR setting's own parameters."""
    cfg = StudyConfig.model_validate({
        "edges": {"a": ["stem"], "b": ["law"]},
        "fusion": {"methods": ["ties", "cat"], "rank": 4, "density": 0.3, "params": {"ties": {"majority": "frequency"}},
                   "cr": ["off", {"name": "top", "strategy": "element", "share": 0.5, "threshold": 0.2}]}})
    f = cfg.fusion
    by_name = {name: (m, s) for m, s, name in f.fusions()}
    ties_top = f.request(*by_name["ties+top"], seed=2, weights=[1, 3])
    assert ties_top == FusionRequest("ties", (1.0, 3.0), rank=4, density=0.3, seed=2, cr="element",
                                     cr_threshold=0.2, params={"majority": "frequency", "cr_share": 0.5})
    cat = f.request(*by_name["cat"])
    assert (cat.rank, cat.density, cat.cr, dict(cat.params)) == (None, None, None, {})
    cat.check()
