"""``entroclip theory drift|trajectory|phase|balance``: the tabular lab from the command line.

Every command takes the same model options (actions, contexts, group size, rewards, optimiser, update
structure, initial policy, seeds: ``theory.options``); ``--out DIR`` writes CSV tables and PNG figures
there, ``--json`` prints one JSON object on stdout. Progress bars go to stderr. A command runs its
experiment and hands the result to ``theory.output``, which shows and writes it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from entroclip.allocator import keep_freed_memory
from entroclip.theory.options import (
    GRID_HELP,
    EpsHigh,
    EpsLow,
    JsonFlag,
    LabOptions,
    parse_bounds,
    parse_grid,
    with_lab_options,
)
from entroclip.theory.output import (
    BalanceReport,
    DriftReport,
    PhaseReport,
    TrajectoryReport,
    lab_errors,
    progress_bar,
)
from entroclip.theory.phase import balance_eps_low, balance_runs, phase_diagram
from entroclip.theory.simulation import counterfactuals, estimate_drift, simulate_trajectory

app = typer.Typer(
    help="Tabular softmax theory lab: expected entropy drift under clipping.", no_args_is_help=True
)


@app.callback()
def _keep_freed_memory() -> None:
    """Every lab command keeps freed memory in the process, as the trainer does by default: its dense
    passes allocate and free arrays of tens of MB at every update."""
    keep_freed_memory()


@app.command()
@with_lab_options
def drift(
    options: LabOptions, eps_low: EpsLow = 0.2, eps_high: EpsHigh = 0.2, as_json: JsonFlag = False
) -> None:
    """Expected entropy change of one update, its clip-low / clip-high effects and the closed form."""
    config, generator, logits = options.start(eps_low, eps_high)
    with lab_errors(), progress_bar("updates", 1 + len(counterfactuals(config.clip))) as advance:
        estimate = estimate_drift(logits, config, options.seeds, generator, advance)
    DriftReport(options, config, estimate).emit(as_json)


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
    config, generator, logits = options.start(eps_low, eps_high)
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
    TrajectoryReport(options, config, result, theory_seeds).emit(as_json)


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
    config, generator, logits = options.start()
    cells = len(eps_lows) * len(eps_highs)
    with lab_errors(), progress_bar("grid cells", cells + 1) as advance:
        diagram = phase_diagram(logits, config, eps_lows, eps_highs, options.seeds, generator, advance)
    PhaseReport(options, config, diagram).emit(as_json)


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
    config, generator, logits = options.start()
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
    BalanceReport(options, config, results).emit(as_json)
