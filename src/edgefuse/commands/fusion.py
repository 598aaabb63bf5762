"""``edgefuse fuse`` and ``edgefuse conflicts``: thin wrappers over `edgefuse.fusion`.

``--adapters DIR...`` marks the directories that follow (also ``--adapters A --adapters B`` style is fine
because the directories are positional). ``--weights`` takes ``0.5,0.5`` or repeats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgefuse.adapters import load_adapter
from edgefuse.commands.interference import interference_stats, print_interference
from edgefuse.commands.options import device_option, dtype_option
from edgefuse.errors import EdgefuseError
from edgefuse.fusion import FusionRequest, analyze_conflicts, fuse_dirs
from edgefuse.fusion.api import _check_inputs
from edgefuse.fusion.registry import COMMON_PARAMS, CR_STRATEGIES, CR_THRESHOLD, FAMILIES, METHODS, RANK_POLICIES
from edgefuse.io import atomic_write_json
from edgefuse.report.figures import conflict_grid, plot_heatmap
from edgefuse.ui import layer_grid, progress_bar

_ADAPTERS_HELP = "the adapter directories follow: --adapters DIR DIR ..."


def _weights(values: Optional[list[str]]) -> Optional[list[float]]:
    if not values:
        return None
    try:
        return [float(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        raise EdgefuseError(f"--weights must be numbers (e.g. 0.5,0.5), got {' '.join(values)}") from None


def _params(values: Optional[list[str]]) -> dict:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise EdgefuseError(f"--param must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _value(v) -> str:
    """A parameter value as ``--param KEY=VALUE`` takes it (JSON, strings bare)."""
    return v if isinstance(v, str) else json.dumps(v)


def _param_line(p) -> str:
    return f"{p.name}={_value(p.default)} ({p.allowed()})"


def list_lines() -> list[str]:
    """``fuse --list``: every method with its family, parameters and defaults, rank policy and paper, then the
    parameters all methods take and the LoRA-CR strategies — all read from `edgefuse.fusion.registry`. Plain
    lines, so a narrow terminal or a pipe never cuts them."""
    out = ["fusion methods (--method NAME; parameters as --density X or --param KEY=VALUE)", ""]
    for s in METHODS.values():
        out.append(f"{s.name}  [{s.family}]  {s.summary}")
        out.append("  parameters: " + (", ".join(_param_line(p) for p in s.params) or "none"))
        out.append(f"  rank: {RANK_POLICIES[s.rank]}")
        out.append(f"  paper: {s.paper}  {s.url}")
        out.append("")
    out += ["families:", *(f"  {n}: {d}" for n, d in FAMILIES.items())]
    out += ["", "parameters every method takes: " + ", ".join(_param_line(p) for p in COMMON_PARAMS)]
    out += ["", f"LoRA-CR strategies (--cr NAME; --cr-threshold {_param_line(CR_THRESHOLD)}, or --cr-share)", ""]
    for c in CR_STRATEGIES.values():
        needs = "; needs --activations" if c.needs_grams else ""
        out.append(f"{c.name}  [steps: {' → '.join(c.steps)}{needs}]  {c.summary}")
    return out


def _print_list() -> None:
    for line in list_lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add ``fuse`` and ``conflicts``."""

    @app.command("fuse")
    def fuse(
        dirs: Optional[list[Path]] = typer.Argument(
            None, help="adapter directories (after --adapters)", show_default=False
        ),
        adapters_flag: bool = typer.Option(False, "--adapters", help=_ADAPTERS_HELP),
        method: Optional[str] = typer.Option(None, "--method", "-m", help="fusion method (see --list)"),
        cr: Optional[str] = typer.Option(None, "--cr", help="LoRA-CR strategy (see --list)"),
        cr_threshold: float = typer.Option(
            CR_THRESHOLD.default, "--cr-threshold", help=CR_THRESHOLD.help
        ),
        cr_share: Optional[float] = typer.Option(
            None, "--cr-share", help="instead of --cr-threshold: edit this share (0, 1] of the modules, most "
            "conflicting first"
        ),
        weights: Optional[list[str]] = typer.Option(
            None, "--weights", help="one weight per adapter: 0.5,0.5"
        ),
        rank: Optional[int] = typer.Option(None, "--rank", help="output rank (default: method's choice)"),
        density: Optional[float] = typer.Option(None, "--density", help="fraction kept, in (0, 1]"),
        seed: int = typer.Option(0, "--seed"),
        param: Optional[list[str]] = typer.Option(
            None, "--param", help="method parameter KEY=VALUE (repeatable)"
        ),
        force: bool = typer.Option(
            False, "--force", help="fuse adapters of different base models; overwrite outputs"
        ),
        out: Optional[Path] = typer.Option(None, "--out", help="output adapter directory"),
        merged_out: Optional[Path] = typer.Option(
            None, "--merged-out", help="also write merged full weights here"
        ),
        model: Optional[str] = typer.Option(
            None, "--model", help="base model: check the adapters' targets and shapes against it; needed for --merged-out"
        ),
        list_: bool = typer.Option(False, "--list", help="list methods and LoRA-CR strategies"),
        activations: Optional[Path] = typer.Option(
            None, "--activations", help="Gram matrices of each domain's module inputs (edgefuse grams), for regmean "
            "and --cr activation"
        ),
        device: Optional[str] = device_option(),
        dtype: Optional[str] = dtype_option("Dtype of the --merged-out weights (the merge runs in float32)"),
    ) -> None:
        """Fuse K LoRA adapters into one (optionally with LoRA-CR conflict resolution)."""
        if list_:
            _print_list()
            return

        if method is None:
            raise EdgefuseError("--method is required (see edgefuse fuse --list)")
        if not dirs:
            raise EdgefuseError("no adapters given (--adapters DIR DIR ...)")
        if out is None:
            raise EdgefuseError("--out is required")

        request = FusionRequest(method, _weights(weights), rank, density, seed, cr, cr_threshold,
                                {**_params(param), **({} if cr_share is None else {"cr_share": cr_share})})
        with progress_bar(f"fuse ({method})", None) as advance:
            res = fuse_dirs(dirs, out, request, force=force, merged_out=merged_out, model=model, progress=advance,
                            device=device, dtype=dtype, activations=activations)
        msg = f"fused {len(dirs)} adapters with {method}"
        if cr:
            c = res["cr"]
            msg += (
                f" + LoRA-CR[{cr}] ({c['modules_flagged']}/{c['modules_total']} modules, "
                f"{100 * c['share_changed']:.2f}% of parameters changed)"
            )
        typer.echo(
            f"{msg}: rank {res['output_rank']}, {res['modules']} modules, {res['wall_s']:.2f}s -> {out}"
        )
        if merged_out:
            typer.echo(f"merged weights -> {merged_out}")

    @app.command("conflicts")
    def conflicts(
        dirs: Optional[list[Path]] = typer.Argument(
            None, help="adapter directories (after --adapters)", show_default=False
        ),
        adapters_flag: bool = typer.Option(False, "--adapters", help=_ADAPTERS_HELP),
        weights: Optional[list[str]] = typer.Option(
            None, "--weights", help="one weight per adapter: 0.5,0.5"
        ),
        plot: Optional[Path] = typer.Option(None, "--plot", help="write a layer × module-type heatmap (PNG)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the full statistics as JSON"),
        activations: Optional[Path] = typer.Option(
            None, "--activations", help="Gram directory (edgefuse grams): also measure interference on each "
            "domain's inputs; --plot then draws it"
        ),
        fused: Optional[Path] = typer.Option(
            None, "--fused", help="with --activations: the fused adapter whose deviation is measured (default: the "
            "weighted sum of the adapters)"
        ),
    ) -> None:
        """Measure conflicts between adapters: per-layer table and optional heatmap."""
        from rich.console import Console


        if not dirs or len(dirs) < 2:
            raise EdgefuseError("conflicts needs at least two adapters (--adapters DIR DIR ...)")
        adapters = [load_adapter(d) for d in dirs]
        w = _weights(weights)
        if w is not None and len(w) != len(adapters):
            raise EdgefuseError(f"{len(w)} weights given for {len(adapters)} adapters")

        _check_inputs(adapters, w or [1.0] * len(adapters))
        if fused is not None and activations is None:
            raise EdgefuseError("--fused needs --activations")
        if activations is not None:
            inter, domains = interference_stats(adapters, w, activations, fused)
        stats = analyze_conflicts(adapters, w)
        layers, types, cells = conflict_grid(stats)
        _, _, signs = conflict_grid(stats, "sign_conflict")
        table = layer_grid(
            "conflict score max(0, −cos) / sign-conflict share, per layer and module type", layers, types,
            lambda layer, t: "-" if cells.get((layer, t)) is None else f"{cells[(layer, t)]:.3f}/{signs[(layer, t)]:.2f}",
        )
        # never cut cells to "0.01…": a piped or narrow terminal still gets every value (one column ≈ 14 chars)
        Console(width=max(Console().width, 10 + 14 * len(types))).print(table)
        s = stats["summary"]
        typer.echo(
            f"{s['modules']} modules: max score {s['max_score']:.3f}, mean {s['mean_score']:.3f}, "
            f"mean sign conflict {s.get('mean_sign_conflict', 0):.3f}"
        )
        if activations is not None:
            print_interference(inter, domains, plot)
            stats["interference"] = inter
        elif plot:
            plot_heatmap(stats, plot)
            typer.echo(f"heatmap -> {plot}")
        if json_out:
            atomic_write_json(json_out, stats)
