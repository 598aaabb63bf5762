"""The fusion registry is the one source of methods, parameters, defaults and LoRA-CR strategies: ``fuse --list``
shows what the specs say, every bound a spec declares is enforced with one line, and a method added as one
spec works through the API and the CLI."""

from dataclasses import replace

import pytest
from helpers.cli import run_cli as run
from helpers.fusion import NAMES, deltas, make_adapters, rel

from edgefuse.artifacts import ExternalAdapterManifest
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import factored, fuse_adapters, registry
from edgefuse.fusion.registry import CR_STRATEGIES, METHODS, MethodSpec, Param


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def ads():
    return make_adapters()


def _shown(v) -> str:
    """How a default is written on the command line (``--param KEY=VALUE`` takes JSON, strings bare)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return v if isinstance(v, str) else repr(v)


def _blocks(text: str) -> dict[str, list[str]]:
    """``--list`` output split into one block of lines per entry (an unindented line starts a block)."""
    out, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
            out[name] = [line]
        elif name is not None and line:
            out[name].append(line)
    return out


def test_list_shows_every_method_with_family_defaults_and_paper(monkeypatch, capsys):
    code, so, _ = run("fuse", "--list")
    assert code == 0
    blocks = _blocks(so)
    for name, spec in METHODS.items():
        block = "\n".join(blocks[name])
        assert f"[{spec.family}]" in blocks[name][0] and spec.summary in blocks[name][0]
        assert spec.paper in block and spec.url in block and spec.url.startswith("https://")
        for p in spec.params:
            assert f"{p.name}={_shown(p.default)}" in block, (name, p.name)
        if not spec.params:
            assert "parameters: none" in block
    assert "density=0.2" in "\n".join(blocks["ties"]) and "majority=total" in "\n".join(blocks["ties"])
    assert "inner=ties" in "\n".join(blocks["knots"]) and "iters=50" in "\n".join(blocks["lora_lego"])
    for p in registry.COMMON_PARAMS:
        assert f"{p.name}={_shown(p.default)}" in so
    for name, strategy in CR_STRATEGIES.items():
        assert name in blocks and strategy.summary in blocks[name][0]
    assert "direction → element" in blocks["hybrid"][0]  # hybrid's steps, in order
    assert "cr_threshold=0.1" in so


def test_every_method_has_a_paper_and_valid_defaults():
    for spec in METHODS.values():
        assert spec.family in registry.FAMILIES and spec.rank in registry.RANK_POLICIES
        assert spec.paper and spec.url
        for p in (*spec.params, *registry.COMMON_PARAMS):
            assert p.accepts(p.default), (spec.name, p.name)
    # the recipes an aligned method may run inside are exactly the methods that have one
    assert METHODS["knots"].param("inner").choices == tuple(n for n, s in METHODS.items() if s.recipe is not None)


@pytest.mark.parametrize(
    "method,param,value,line",
    [
        ("breadcrumbs", "gamma", 1.0, "gamma must be in [0, 1), got 1.0"),
        ("breadcrumbs", "gamma", -0.1, "gamma must be in [0, 1), got -0.1"),
        ("lora_lego", "iters", -1, "iters must be an integer ≥ 0, got -1"),
        ("lora_lego", "iters", 2.5, "iters must be an integer ≥ 0, got 2.5"),
        ("ties", "majority", "most", "majority must be one of total, frequency, got 'most'"),
        ("knots", "inner", "svd", "inner must be one of task_arithmetic, ties, dare_linear, dare_ties, "
                                  "magnitude_prune, breadcrumbs, breadcrumbs_ties, got 'svd'"),
        ("linear", "normalize", "yes", "normalize must be true or false, got 'yes'"),
        ("svd", "workers", 0, "workers must be an integer ≥ 1, got 0"),
        ("svd", "cr_share", 0, "cr_share must be in (0, 1], got 0"),
        ("svd", "cr_element_threshold", -0.5, "cr_element_threshold must be a number ≥ 0, got -0.5"),
        ("ties", "svd_solver", "qr", "svd_solver must be one of gram, exact, randomized, auto, got 'qr'"),
    ],
)
def test_out_of_bounds_parameter_is_one_line_from_the_spec(ads, method, param, value, line):
    with pytest.raises(EdgefuseError) as e:
        fuse_adapters(ads, method, **{param: value})
    assert str(e.value) == line


def test_every_declared_bound_is_enforced(ads):
    """For every numeric parameter of every spec, a value just outside each declared bound is refused, naming
    the parameter and the bound; the bound itself is accepted exactly when the spec says it is closed."""
    for spec in METHODS.values():
        for p in (*spec.params, *registry.COMMON_PARAMS):
            if p.choices is not None or p.kind in (bool, str):
                continue
            for bound, is_open, outside in ((p.low, p.low_open, -1), (p.high, p.high_open, +1)):
                if bound is None:
                    continue
                assert p.accepts(bound) is not is_open, (spec.name, p.name)
                bad = bound + outside
                assert not p.accepts(bad)
                with pytest.raises(EdgefuseError, match=f"^{p.name} must be .*{bound:g}.*, got {bad!r}$"):
                    if p.name == "density":
                        fuse_adapters(ads, spec.name, density=bad)
                    else:
                        fuse_adapters(ads, spec.name, **{p.name: bad})


def test_cli_refuses_out_of_bounds_param_with_one_line(tmp_path, monkeypatch, capsys):
    from edgefuse.adapters import save_adapter

    dirs = []
    for k, a in enumerate(make_adapters()):
        save_adapter(a, tmp_path / f"a{k}", ExternalAdapterManifest())
        dirs.append(tmp_path / f"a{k}")
    out = tmp_path / "never"
    code, _, se = run("fuse", "--method", "breadcrumbs", "--param", "gamma=1.5",
                      "--adapters", *dirs, "--out", out)
    assert code != 0 and se.strip() == "error: gamma must be in [0, 1), got 1.5"
    code, _, se = run("fuse", "--method", "ties", "--cr", "element", "--cr-threshold", "-1",
                      "--adapters", *dirs, "--out", out)
    assert code != 0 and se.strip() == "error: cr_threshold must be a number ≥ 0, got -1.0"
    assert not out.exists()


def test_a_method_added_as_one_spec_works_everywhere(ads, monkeypatch, capsys):
    """A new configuration of an existing kernel needs nothing but its spec: it fuses (checked against the
    dense sum), its parameter is validated from its bounds, and ``--list`` shows it."""
    spec = MethodSpec(
        "half_sum", "factored", factored.weighted_sum, "half the weighted sum", "a test paper", "https://example.org",
        params=(Param("scaling", 0.5, "λ", low=0, high=1),), rank="exact",
    )
    monkeypatch.setitem(METHODS, "half_sum", spec)
    W = [0.5, 1.5, -0.7]
    fused, stats = fuse_adapters(ads, "half_sum", W)
    assert stats["params"]["scaling"] == 0.5
    for name in NAMES:
        ref = 0.5 * sum(w * d for w, d in zip(W, deltas(ads, name)))
        assert rel(fused.modules[name].delta(), ref) < 1e-6
    with pytest.raises(EdgefuseError, match=r"^scaling must be in \[0, 1\], got 2$"):
        fuse_adapters(ads, "half_sum", scaling=2)
    code, so, _ = run("fuse", "--list")
    assert code == 0 and "half_sum  [factored]  half the weighted sum" in so and "scaling=0.5 (in [0, 1])" in so
    monkeypatch.setitem(METHODS, "half_sum", replace(spec, rank="max"))
    fused, _ = fuse_adapters(ads, "half_sum", W)
    assert max(m.rank for m in fused.modules.values()) == max(m.rank for a in ads for m in a.modules.values())


def test_aligned_inner_recipe_comes_from_the_named_spec(ads):
    """``inner=task_arithmetic`` runs task arithmetic's recipe on the aligned parts: lossless, so both aligned
    methods give the exact weighted sum at full rank."""
    W = [0.5, 1.5, -0.7]
    for method in ("knots", "core_space"):
        fused, _ = fuse_adapters(ads, method, W, rank=12, inner="task_arithmetic")
        for name in NAMES:
            ref = sum(w * d for w, d in zip(W, deltas(ads, name)))
            assert rel(fused.modules[name].delta(), ref) < 1e-5
    assert registry.recipe_for(METHODS["knots"], {"inner": "dare_ties"}) == METHODS["dare_ties"].recipe
