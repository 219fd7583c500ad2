"""The options every ``entroclip theory`` command shares, their parsers and their checks.

:func:`with_lab_options` adds the model, update, initial-policy and seed options to a command and hands
them to it as one :class:`LabOptions`; a bad value or combination exits 2 (``typer.BadParameter``) with
the option it concerns.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer

from entroclip.losses import PolicyLossKind
from entroclip.resources import available_memory, format_bytes
from entroclip.theory.policies import initial_logits
from entroclip.theory.rewards import RandomReward
from entroclip.theory.updates import DEFAULT_LR, ClipBounds, LabConfig


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
    loss: Literal["ppo", "gspo", "cispo", "sapo", "ce_gppo"]
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

    def start(
        self, eps_low: float | None = None, eps_high: float | None = None
    ) -> tuple[LabConfig, torch.Generator, torch.Tensor]:
        """What an experiment starts from: the update rule with these clip bounds, the experiment's one
        random stream, and the initial logits, which take its first draws (the simulation the rest)."""
        config = self.config(eps_low, eps_high)
        generator = torch.Generator().manual_seed(self.seed)
        return config, generator, self.logits(generator)

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
                loss=None if self.loss == "ppo" else PolicyLossKind(self.loss),
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

    def settings(self, config: LabConfig) -> dict[str, Any]:
        """Everything that defines a result, for its JSON and CSV companions."""
        settings = {key: value for key, value in asdict(self).items() if key != "out"}
        settings.update(lr=config.lr, eps_low=config.clip.eps_low, eps_high=config.clip.eps_high)
        return settings

    def title(self, config: LabConfig) -> str:
        """A figure's title: the update and the initial policy."""
        return (
            f"{config.optimiser} lr={config.lr:g}, mu={config.passes}, {config.minibatches} minibatches, "
            f"n={self.n}, K={self.contexts}, H0={self.entropy if self.init != 'uniform' else 'log n'}"
        )


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
        "loss",
        "ppo",
        Annotated[
            Literal["ppo", "gspo", "cispo", "sapo", "ce_gppo"],
            _option(
                "--loss",
                help="Clipping scheme (entroclip.losses; the kind's own parameters at their defaults, the "
                "bounds from --eps-low / --eps-high); one action per sample, so GSPO clips like PPO.",
            ),
        ],
    ),
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
