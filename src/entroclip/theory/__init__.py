"""Tabular softmax theory lab: the paper's clip-low / clip-high entropy theorems, exactly and by Monte Carlo.

Modules, one job each:

- ``softmax``: batched policies ``[seeds, contexts, actions]`` with exact normaliser, entropy, dH/dlogits;
- ``policies``: initial logits (uniform, Zipf-like, Dirichlet) at a chosen entropy;
- ``rewards``: action-independent random rewards, group advantages and E[max(A, 0)];
- ``updates``: one GRPO update (sampling, the core's clipped surrogate, PG / NPG / Adam steps);
- ``theorems``: Theorems 1 and 2 in closed form, the finite-difference check, Ineq. 7 along a path;
- ``simulation``: one inner step, one update and trajectories over many seeds at once;
- ``phase``: drift over a grid of clip bounds and the eps_low that holds entropy steady;
- ``plots``: CSV tables and PNG figures;
- ``cli``: ``entroclip theory ...``, with its shared options in ``options`` and what it shows and writes
  in ``output``.
"""

from entroclip.theory.phase import Balance, PhaseDiagram, balance_eps_low, phase_diagram
from entroclip.theory.policies import initial_logits, temper_to_entropy
from entroclip.theory.rewards import RandomReward
from entroclip.theory.simulation import (
    DriftEstimate,
    Estimate,
    StepCheck,
    Trajectory,
    check_step,
    estimate_drift,
    simulate_trajectory,
)
from entroclip.theory.softmax import SoftmaxState
from entroclip.theory.theorems import (
    ClosedForm,
    PathTheory,
    closed_form_step,
    entropy_directional_derivative,
)
from entroclip.theory.updates import DEFAULT_LR, NO_CLIP, ClipBounds, LabConfig, lab_update, sample_batch

__all__ = [
    "DEFAULT_LR",
    "NO_CLIP",
    "Balance",
    "ClipBounds",
    "ClosedForm",
    "DriftEstimate",
    "Estimate",
    "LabConfig",
    "PathTheory",
    "PhaseDiagram",
    "RandomReward",
    "SoftmaxState",
    "StepCheck",
    "Trajectory",
    "balance_eps_low",
    "check_step",
    "closed_form_step",
    "entropy_directional_derivative",
    "estimate_drift",
    "initial_logits",
    "lab_update",
    "phase_diagram",
    "sample_batch",
    "simulate_trajectory",
    "temper_to_entropy",
]
