"""``entroclip theory drift|trajectory|phase|balance``: the tabular lab from the command line.

Every command takes the same model options (actions, contexts, group size, rewards, optimiser, update
structure, initial policy, seeds); ``--out DIR`` writes CSV tables and PNG figures there, ``--json``
prints one JSON object on stdout. Progress bars go to stderr.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from entroclip.allocator import keep_freed_memory
from entroclip.consoles import unwrapped_console
from entroclip.resources import available_memory, format_bytes
from entroclip.theory import plots
from entroclip.theory.phase import balance_eps_low, balance_runs, phase_diagram
from entroclip.theory.policies import initial_logits
from entroclip.theory.rewards import RandomReward
from entroclip.theory.simulation import (
    Estimate,
    Trajectory,
    counterfactuals,
    estimate_drift,
    simulate_trajectory,
)
from entroclip.theory.theorems import ConditionTally
from entroclip.theory.updates import DEFAULT_LR, ClipBounds, LabConfig

app = typer.Typer(
    help="Tabular softmax theory lab: expected entropy drift under clipping.", no_args_is_help=True
)
stdout = unwrapped_console(stderr=False)
stderr = unwrapped_console()


@app.callback()
def _keep_freed_memory() -> None:
    """Every lab command keeps freed memory in the process, as the trainer does by default: its dense
    passes allocate and free arrays of tens of MB at every update."""
    keep_freed_memory()


def say(text: str) -> None:
    """Plain text on stdout (no rich markup: the lab's formulas contain brackets)."""
    stdout.print(text, markup=False, highlight=False)


def _optional_bound(
    text: str | float, allowed: str, contains: Callable[[float], bool], off: str
) -> float | None:
    """A number in ``allowed``, or ``none`` (that side off); BadParameter (exit 2) otherwise."""
    text = str(text)
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not contains(value):
        raise typer.BadParameter(f"{text!r} is not in the range {allowed} (or 'none': {off})")
    return value


def parse_eps_low(text: str | float) -> float | None:
    return _optional_bound(text, "[0, 1]", lambda v: 0.0 <= v <= 1.0, "no clip-low")


def parse_eps_high(text: str | float) -> float | None:
    return _optional_bound(text, "[0, inf)", lambda v: 0.0 <= v < math.inf, "no clip-high")


def parse_dual_clip(text: str | float) -> float | None:
    return _optional_bound(text, "(1, inf)", lambda v: 1.0 < v < math.inf, "no dual-clip")


def parse_grid(text: str, option: str) -> list[float]:
    """``start:stop:count`` (evenly spaced, inclusive) or a comma-separated list of clip bounds in [0, 1]."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            if int(count) < 1:
                raise ValueError
            values = torch.linspace(float(start), float(stop), int(count), dtype=torch.float64).tolist()
        else:
            values = [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not START:STOP:COUNT or a comma-separated list of numbers", param_hint=option
        ) from None
    if not all(0.0 <= value <= 1.0 for value in values):
        raise typer.BadParameter(f"{text!r}: every value must be in the range [0, 1]", param_hint=option)
    return values


def parse_bounds(text: str, option: str) -> list[float | None]:
    """Comma-separated eps_high values (each >= 0 or ``none``)."""
    try:
        return [parse_eps_high(part) for part in text.split(",")]
    except typer.BadParameter as error:
        raise typer.BadParameter(error.message, param_hint=option) from None


@dataclass(frozen=True)
class LabOptions:
    """The options every command shares: the model, the update, the initial policy, the seeds."""

    n: int
    contexts: int
    group_size: int
    prompts: int
    p: float
    reward: Literal["bernoulli", "gaussian"]
    advantage: Literal["grpo", "drgrpo", "rloo"]
    optimiser: Literal["pg", "npg", "adam"]
    lr: float | None
    mu: int
    minibatches: int
    dual_clip: float | None
    init: Literal["uniform", "zipf", "dirichlet"]
    entropy: float
    dirichlet_alpha: float
    seeds: int
    seed: int
    dtype: Literal["float64", "float32"]
    out: Path | None

    def config(self, eps_low: float | None = None, eps_high: float | None = None) -> LabConfig:
        """The update rule, with these clip bounds; bad combinations exit 2 with the reason."""
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise typer.BadParameter(f"{self.lr} is not in the range (0, inf)", param_hint="'--lr'")
        if not 0.0 < self.p < 1.0:
            raise typer.BadParameter(f"{self.p} is not in the range (0, 1)", param_hint="'--p'")
        try:
            return LabConfig(
                clip=ClipBounds(eps_low, eps_high, self.dual_clip),
                optimiser=self.optimiser,
                lr=DEFAULT_LR[self.optimiser] if self.lr is None else self.lr,
                passes=self.mu,
                minibatches=self.minibatches,
                prompts=self.prompts,
                group_size=self.group_size,
                reward=RandomReward(self.reward, self.p, self.advantage),
            )
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None

    def logits(self, generator: torch.Generator) -> torch.Tensor:
        """Initial logits ``[contexts, n]`` (a Dirichlet policy draws from ``generator``)."""
        self.check_memory()
        try:
            return initial_logits(
                self.init,
                self.n,
                self.contexts,
                None if self.init == "uniform" else self.entropy,
                dirichlet_alpha=self.dirichlet_alpha,
                generator=generator,
                dtype=getattr(torch, self.dtype),
            )
        except ValueError as error:
            raise typer.BadParameter(
                str(error), param_hint="'--init' / '--entropy' / '--dirichlet-alpha'"
            ) from None

    def check_memory(self) -> None:
        """Refuse policies that cannot fit in memory, with the estimate: the seeds' logits and, at most,
        about eight more arrays of their size (probabilities, gradient, Adam's moments, a step's
        temporaries)."""
        need = 9 * self.seeds * self.contexts * self.n * getattr(torch, self.dtype).itemsize
        free = available_memory(torch.device("cpu"))
        if free is not None and need > free:
            raise typer.BadParameter(
                f"{self.seeds} seeds x {self.contexts} contexts x {self.n} actions need about "
                f"{format_bytes(need)} of memory and {format_bytes(free)} is free",
                param_hint="'--seeds' / '--contexts' / '--n'",
            )

    def generator(self) -> torch.Generator:
        """The experiment's one random stream: the initial policy first, then the simulation."""
        return torch.Generator().manual_seed(self.seed)

    def settings(self, config: LabConfig) -> dict[str, Any]:
        """Everything that defines a result, for its JSON and CSV companions."""
        settings = {key: value for key, value in asdict(self).items() if key != "out"}
        settings.update(lr=config.lr, eps_low=config.clip.eps_low, eps_high=config.clip.eps_high)
        return settings


LR_DEFAULTS = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())


def _option(*names: str, **kwargs: Any) -> Any:
    return typer.Option(*names, rich_help_panel="Model and update", **kwargs)


_LAB_OPTIONS: list[tuple[str, Any, Any]] = [
    ("n", 1000, Annotated[int, _option("--n", min=2, help="Actions per context.")]),
    (
        "contexts",
        1,
        Annotated[int, _option("--contexts", "-K", min=1, help="Contexts (independent states).")],
    ),
    (
        "group_size",
        8,
        Annotated[int, _option("--group-size", "-G", min=2, help="Samples per group (prompt).")],
    ),
    (
        "prompts",
        4,
        Annotated[int, _option("--prompts", min=1, help="Groups per batch; contexts drawn uniformly.")],
    ),
    ("p", 0.5, Annotated[float, _option("--p", help="Bernoulli success probability, in (0, 1).")]),
    ("reward", "bernoulli", Annotated[Literal["bernoulli", "gaussian"], _option("--reward")]),
    ("advantage", "grpo", Annotated[Literal["grpo", "drgrpo", "rloo"], _option("--advantage")]),
    ("optimiser", "pg", Annotated[Literal["pg", "npg", "adam"], _option("--optimiser")]),
    (
        "lr",
        None,
        Annotated[
            float | None,
            _option("--lr", help=f"Step size on the logits, > 0 (default per optimiser: {LR_DEFAULTS})."),
        ],
    ),
    ("mu", 1, Annotated[int, _option("--mu", min=1, help="Passes over each batch.")]),
    ("minibatches", 4, Annotated[int, _option("--minibatches", min=1, help="Minibatches per pass.")]),
    (
        "dual_clip",
        "none",
        Annotated[
            float | None, _option("--dual-clip", parser=parse_dual_clip, metavar="C|none", help="c > 1.")
        ],
    ),
    (
        "init",
        "zipf",
        Annotated[Literal["uniform", "zipf", "dirichlet"], _option("--init", help="Initial policy.")],
    ),
    (
        "entropy",
        1.0,
        Annotated[float, _option("--entropy", help="Initial entropy (nats) of zipf / dirichlet.")],
    ),
    ("dirichlet_alpha", 1.0, Annotated[float, _option("--dirichlet-alpha", help="Concentration, > 0.")]),
    ("seeds", 2000, Annotated[int, _option("--seeds", min=2, help="Independent runs in parallel.")]),
    ("seed", 0, Annotated[int, _option("--seed", help="Random seed of the whole experiment.")]),
    (
        "dtype",
        "float64",
        Annotated[
            Literal["float64", "float32"],
            _option(
                "--dtype",
                help="float64 resolves entropy changes of 1e-8; float32 is faster, to about 1e-6.",
            ),
        ],
    ),
    ("out", None, Annotated[Path | None, _option("--out", help="Folder for CSV tables and PNG figures.")]),
]


def with_lab_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the shared options to a command's signature and pass them in as ``options: LabOptions``."""
    signature = inspect.signature(command, eval_str=True)
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, default, annotation in _LAB_OPTIONS
    ]
    own = [parameter for name, parameter in signature.parameters.items() if name != "options"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        shared_values = {name: kwargs.pop(name) for name, _, _ in _LAB_OPTIONS}
        command(options=LabOptions(**shared_values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
    return wrapper


EpsLow = Annotated[
    float | None, typer.Option("--eps-low", parser=parse_eps_low, metavar="FLOAT|none", help="In [0, 1].")
]
EpsHigh = Annotated[
    float | None, typer.Option("--eps-high", parser=parse_eps_high, metavar="FLOAT|none", help=">= 0.")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
GRID_HELP = "Evenly spaced START:STOP:COUNT, or comma-separated values, each in [0, 1]."


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (silent when stderr is not a terminal); yields ``advance(units)``."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda units: progress.advance(task, units)


@contextmanager
def lab_errors() -> Iterator[None]:
    """Report a diverged run or an impossible search as one line on stderr, exit code 1."""
    try:
        yield
    except (FloatingPointError, ValueError) as error:
        stderr.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def print_json(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(_finite(payload), allow_nan=False))


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _estimate(estimate: Estimate | None) -> str:
    return "n/a" if estimate is None else f"{estimate.mean:+.4g} ± {1.96 * estimate.stderr:.2g}"


def _tally(tally: ConditionTally, cases: str) -> str:
    if not tally.total:
        return f"no {cases} cases"
    return f"held in {tally.fraction:.3f} of {tally.total} {cases} cases"


def _title(config: LabConfig, options: LabOptions) -> str:
    return (
        f"{config.optimiser} lr={config.lr:g}, mu={config.passes}, {config.minibatches} minibatches, "
        f"n={options.n}, K={options.contexts}, H0={options.entropy if options.init != 'uniform' else 'log n'}"
    )


@app.command()
@with_lab_options
def drift(
    options: LabOptions, eps_low: EpsLow = 0.2, eps_high: EpsHigh = 0.2, as_json: JsonFlag = False
) -> None:
    """Expected entropy change of one update, its clip-low / clip-high effects and the closed form."""
    config = options.config(eps_low, eps_high)
    generator = options.generator()
    logits = options.logits(generator)
    with lab_errors(), progress_bar("updates", 1 + len(counterfactuals(config.clip))) as advance:
        estimate = estimate_drift(logits, config, options.seeds, generator, advance)
    result = {**estimate.to_dict(), "settings": options.settings(config)}
    if options.out is not None:
        flat = {key: value for key, value in result.items() if key != "settings"}
        flat.update(options.settings(config))
        plots.write_csv(options.out / "drift.csv", list(flat), [list(flat.values())])
        plots.save_png(plots.drift_figure(estimate, _title(config, options)), options.out / "drift.png")
    if as_json:
        print_json(result)
        return
    table = Table(title=f"nats per update, mean ± 95% CI, {options.seeds} seeds")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = {
        "entropy before": f"{estimate.entropy_before:.4f}",
        "drift": _estimate(estimate.drift),
        "  without any clipping": _estimate(estimate.unclipped),
        "  effect of clip-low": _estimate(estimate.effect_low),
        "  effect of clip-high": _estimate(estimate.effect_high),
        "first-order part": _estimate(estimate.first_order),
        "closed form (Theorem 1/2)": _estimate(estimate.closed_form),
        "clip fraction low / high": f"{estimate.clip_fractions.low:.4f} / {estimate.clip_fractions.high:.4f}",
        "Ineq. 7 holds (low / high)": (
            f"{estimate.sign_conditions.low.fraction:.3f} / {estimate.sign_conditions.high.fraction:.3f}"
        ),
    }
    for name, value in rows.items():
        table.add_row(name, value)
    stdout.print(table)


@app.command()
@with_lab_options
def trajectory(
    options: LabOptions,
    eps_low: EpsLow = 0.2,
    eps_high: EpsHigh = 0.2,
    updates: Annotated[int, typer.Option("--updates", "-T", min=1, help="Updates to run.")] = 200,
    track_theory: Annotated[
        bool, typer.Option(help="Closed form and Ineq. 7 at every inner step (several extra passes).")
    ] = True,
    theory_seeds: Annotated[
        int, typer.Option(min=1, help="Seeds on which the closed form and Ineq. 7 are tracked.")
    ] = 256,
    as_json: JsonFlag = False,
) -> None:
    """Entropy over T updates: mean, 95% confidence band and seed band; Ineq. 7 along the way."""
    config = options.config(eps_low, eps_high)
    generator = options.generator()
    logits = options.logits(generator)
    with lab_errors(), progress_bar("updates", updates) as advance:
        result = simulate_trajectory(
            logits,
            config,
            updates,
            options.seeds,
            generator,
            track_theory=track_theory,
            theory_seeds=theory_seeds,
            progress=advance,
        )
    signs = result.sign_conditions
    summary: dict[str, Any] = {
        "entropy_start": result.entropy_mean[0].item(),
        "entropy_end": result.entropy_mean[-1].item(),
        "entropy_end_ci": result.entropy_ci[-1].tolist(),
        "mean_drift_per_update": (result.entropy_mean[-1] - result.entropy_mean[0]).item() / updates,
        "clip_ratio_low": result.clip_fractions[:, 0].mean().item(),
        "clip_ratio_high": result.clip_fractions[:, 1].mean().item(),
        "sign_condition_low": None if signs is None else signs.low.fraction,
        "sign_condition_high": None if signs is None else signs.high.fraction,
        "sign_condition_cases": None if signs is None else [signs.low.total, signs.high.total],
        "counterexample": None,
        "settings": {**options.settings(config), "updates": updates, "theory_seeds": theory_seeds},
    }
    example = result.counterexample
    if example is not None:
        summary["counterexample"] = {
            "side": example.side,
            "event_probability": example.event_probability,
            "gap": example.gap,
        }
    if options.out is not None:
        _write_trajectory(options.out, result)
        plots.save_png(
            plots.trajectory_figure(result, _title(config, options)), options.out / "trajectory.png"
        )
    if as_json:
        print_json(summary)
        return
    say(
        f"entropy {summary['entropy_start']:.4f} -> {summary['entropy_end']:.4f} nats in {updates} updates "
        f"(95% CI {result.entropy_ci[-1, 0]:.4f}..{result.entropy_ci[-1, 1]:.4f}, {options.seeds} seeds); "
        f"clip fractions low {summary['clip_ratio_low']:.4f}, high {summary['clip_ratio_high']:.4f}"
    )
    if signs is not None:
        say(
            f"Ineq. 7: {_tally(signs.low, 'clip-low')}; {_tally(signs.high, 'clip-high')} "
            f"(inner steps x contexts of the first {min(theory_seeds, options.seeds)} seeds)"
        )
    if example is not None:
        say(
            f"counterexample ({example.side} side): P(event) = {example.event_probability:.4g}, "
            f"E[s] - E[s | event] = {example.gap:.4g} < 0"
            + (f"; written to {options.out / 'counterexample.csv'}" if options.out is not None else "")
        )


def _write_trajectory(out: Path, result: Trajectory) -> None:
    updates = result.clip_fractions.shape[0]
    tracked = {"first_order": result.first_order, "closed_form": result.closed_form}
    rows = []
    for t in range(updates + 1):
        row = [
            t,
            result.entropy_mean[t].item(),
            *result.entropy_ci[t].tolist(),
            *result.entropy_band[t].tolist(),
        ]
        row += result.clip_fractions[t - 1].tolist() if t > 0 else [None, None, None]
        row += [None if series is None or t == 0 else series[t - 1].item() for series in tracked.values()]
        rows.append(row)
    header = ["update", "entropy_mean", "ci_low", "ci_high", "band_low", "band_high"]
    header += ["clip_ratio_low", "clip_ratio_high", "clip_ratio_dual", *tracked]
    plots.write_csv(out / "trajectory.csv", header, rows)
    example = result.counterexample
    if example is not None:
        log_ratio = example.log_probs - example.log_probs_old
        plots.write_csv(
            out / "counterexample.csv",
            ["action", "log_prob_old", "log_prob", "ratio", "side", "gap"],
            (
                [a, old, new, math.exp(ratio), example.side, example.gap]
                for a, (old, new, ratio) in enumerate(
                    zip(
                        example.log_probs_old.tolist(),
                        example.log_probs.tolist(),
                        log_ratio.tolist(),
                        strict=True,
                    )
                )
            ),
        )


@app.command()
@with_lab_options
def phase(
    options: LabOptions,
    eps_low_grid: Annotated[
        str, typer.Option(metavar="START:STOP:COUNT|LIST", help=GRID_HELP)
    ] = "0.05:0.4:8",
    eps_high_grid: Annotated[
        str, typer.Option(metavar="START:STOP:COUNT|LIST", help=GRID_HELP)
    ] = "0.05:0.4:8",
    as_json: JsonFlag = False,
) -> None:
    """Drift per update over a grid of (eps_low, eps_high), with its zero contour."""
    eps_lows = parse_grid(eps_low_grid, "'--eps-low-grid'")
    eps_highs = parse_grid(eps_high_grid, "'--eps-high-grid'")
    config = options.config()
    generator = options.generator()
    logits = options.logits(generator)
    cells = len(eps_lows) * len(eps_highs)
    with lab_errors(), progress_bar("grid cells", cells + 1) as advance:
        diagram = phase_diagram(logits, config, eps_lows, eps_highs, options.seeds, generator, advance)
    cells_rows = [
        [low, high, diagram.drift[i, j].item(), diagram.stderr[i, j].item(), diagram.clip_effect[i, j].item()]
        for i, low in enumerate(eps_lows)
        for j, high in enumerate(eps_highs)
    ]
    if options.out is not None:
        plots.write_csv(
            options.out / "phase.csv", ["eps_low", "eps_high", "drift", "stderr", "clip_effect"], cells_rows
        )
        plots.save_png(plots.phase_figure(diagram, _title(config, options)), options.out / "phase.png")
    if as_json:
        print_json(
            {
                "eps_low": eps_lows,
                "eps_high": eps_highs,
                "drift": diagram.drift.tolist(),
                "stderr": diagram.stderr.tolist(),
                "drift_unclipped": diagram.unclipped.mean,
                "drift_unclipped_stderr": diagram.unclipped.stderr,
                "settings": options.settings(config),
            }
        )
        return
    table = Table(title="drift per update (1e-3 nats); rows eps_low, columns eps_high")
    table.add_column("low \\ high")
    for high in eps_highs:
        table.add_column(f"{high:.3g}", justify="right")
    for i, low in enumerate(eps_lows):
        table.add_row(f"{low:.3g}", *(f"{1e3 * value:+.2f}" for value in diagram.drift[i].tolist()))
    stdout.print(table)
    say(f"without clipping: {_estimate(diagram.unclipped)} nats per update")


@app.command()
@with_lab_options
def balance(
    options: LabOptions,
    eps_high: Annotated[
        str, typer.Option(metavar="LIST", help="Comma-separated eps_high values, each >= 0 or none.")
    ] = "0.2,0.28",
    tolerance: Annotated[
        float, typer.Option(min=1e-6, max=0.5, help="Bisection tolerance on eps_low.")
    ] = 1e-3,
    scan_points: Annotated[
        int, typer.Option(min=2, help="Scan of eps_low over [0, 1] before bisection.")
    ] = 11,
    as_json: JsonFlag = False,
) -> None:
    """The eps_low that holds entropy steady for each eps_high, checked on fresh seeds."""
    eps_highs = parse_bounds(eps_high, "'--eps-high'")
    config = options.config()
    generator = options.generator()
    logits = options.logits(generator)
    per_search = balance_runs(scan_points, tolerance)
    results = []
    with lab_errors(), progress_bar("balance", per_search * len(eps_highs)) as advance:
        for high in eps_highs:
            results.append(
                balance_eps_low(
                    logits,
                    config,
                    high,
                    options.seeds,
                    generator,
                    scan_points=scan_points,
                    tolerance=tolerance,
                    progress=advance,
                )
            )
    rows = [[b.eps_high, b.eps_low, b.eps_low_stderr, b.check.mean, b.check.stderr] for b in results]
    if options.out is not None:
        plots.write_csv(
            options.out / "balance.csv",
            ["eps_high", "eps_low", "eps_low_stderr", "check_drift", "check_stderr"],
            rows,
        )
        plots.write_csv(
            options.out / "balance_search.csv",
            ["eps_high", "eps_low", "drift"],
            ([b.eps_high, low, value] for b in results for low, value in b.evaluations),
        )
        plots.save_png(plots.balance_figure(results, _title(config, options)), options.out / "balance.png")
    if as_json:
        print_json(
            {
                "balance": [
                    {
                        "eps_high": h,
                        "eps_low": low,
                        "eps_low_stderr": low_se,
                        "check_drift": drift,
                        "check_stderr": se,
                    }
                    for h, low, low_se, drift, se in rows
                ],
                "settings": options.settings(config),
            }
        )
        return
    for b in results:
        say(
            f"eps_high={b.eps_high}: eps_low={b.eps_low:.4f} ± {1.96 * b.eps_low_stderr:.2g} (95%) holds "
            f"entropy; drift there on fresh seeds {_estimate(b.check)} nats per update"
        )
