"""Batched tabular softmax policies: logits, their exponentials and the exact normaliser.

Shapes: ``[S, K, n]`` for S independent seeds, K contexts (states) and n actions. Entropies are in nats.
The lab works in the dtype of the logits (float64 by default) so that entropy changes of 1e-8 and finite
differences are resolved; :func:`entroclip.entropy.token_entropy` computes in float32 by design (it is
built for LLM vocabularies) and is the reference the tests hold these values to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entroclip.compiling import CompiledForLargeInputs

#: Largest |log normaliser| tolerated before the logits of a row are shifted back to log-probabilities.
REBASE = 30.0
#: Running sums the sampler keeps at a time (float64 elements: 8 MiB), so that its searches hit the cache.
SAMPLE_CHUNK = 1 << 20


def _shift_and_exponentiate(logits: Tensor, weights: Tensor, shift: Tensor) -> Tensor:
    """``logits -= shift``, then ``weights = exp(logits)``, in place; returns the new weights' sums.

    Args:
        logits, weights: ``[S, K, n]``, changed in place; shift: ``[S, K, 1]``.
    Returns: ``[S, K, 1]``.
    """
    logits.sub_(shift)
    return torch.exp(logits, out=weights).sum(-1, keepdim=True)


def _step_and_exponentiate(logits: Tensor, weights: Tensor, factor: Tensor, shift: Tensor) -> Tensor:
    """``logits += factor * weights`` (``factor`` ``[S, K, 1]``), then :func:`_shift_and_exponentiate`."""
    logits.addcmul_(weights, factor)
    return _shift_and_exponentiate(logits, weights, shift)


def _sums_for_entropy(weights: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """sum_a weights_a and sum_a weights_a * logits_a per row, each ``[S, K, 1]``, in one pass."""
    return weights.sum(-1, keepdim=True), (weights * logits).sum(-1, keepdim=True)


def _scaled_uniforms(cumulative: Tensor, uniforms: Tensor) -> Tensor:
    """``uniforms`` ``[R, d]`` in [0, 1) times each row's total ``cumulative[:, -1]``, kept below the total:
    a product that rounded up to it would land past the last action of positive weight."""
    total = cumulative[:, -1:]
    return torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))


def _inverse_cdf(cumulative: Tensor, uniforms: Tensor) -> Tensor:
    """For running sums ``cumulative`` ``[R, n]`` (non-decreasing rows) and ``uniforms`` ``[R, d]`` in
    [0, 1), the number of running sums <= u * total, int64 ``[R, d]``: the sampled action (that is
    ``torch.searchsorted(cumulative, u * total, right=True)``).

    Written as a branch-free binary search (one probe per power of two below n), which compiles into one
    loop; it takes about 2/3 of the time of ``searchsorted``, whose probes miss the cache as often. The
    largest power of two is found by comparisons with n, so that a compiled graph serves every n
    between two powers of two (torch.compile guards on the comparisons, not on n itself)."""
    targets = _scaled_uniforms(cumulative, uniforms)
    n = cumulative.shape[-1]
    found = torch.zeros(targets.shape, dtype=torch.int64, device=targets.device)
    step = 1
    while 2 * step <= n:
        step *= 2
    while step:
        probe = found + (step - 1)
        inside = probe < n
        below = cumulative.gather(1, probe.clamp(max=n - 1)) <= targets
        found = found + torch.where(inside & below, step, 0)
        step >>= 1
    return found


def _searchsorted(cumulative: Tensor, uniforms: Tensor) -> Tensor:
    """:func:`_inverse_cdf` by ``torch.searchsorted`` (the eager path: fewer operations)."""
    return torch.searchsorted(cumulative, _scaled_uniforms(cumulative, uniforms), right=True)


_shift_pass = CompiledForLargeInputs(_shift_and_exponentiate, "the theory lab")
_step_pass = CompiledForLargeInputs(_step_and_exponentiate, "the theory lab")
_entropy_pass = CompiledForLargeInputs(_sums_for_entropy, "the theory lab")
_inverse_cdf_pass = CompiledForLargeInputs(_inverse_cdf, "the theory lab", _searchsorted)


class SoftmaxState:
    """Policies softmax(logits) ``[S, K, n]``, kept with their ``weights`` = exp(logits) ``[S, K, n]`` (the
    unnormalised probabilities) and ``log_norm`` = log of the weights' sum over actions ``[S, K, 1]``.

    The steps and the sampler work on the weights and the normaliser, so the normalised probabilities
    are never formed in the hot path; :attr:`probs` computes (and caches) them on demand. Change the
    logits only through :meth:`refresh` (after an in-place dense change), :meth:`step_along_probs` or
    :meth:`add_at` (a sparse change, which updates the weights and ``log_norm`` in O(changes)).
    ``norm_error`` ``[S, K, 1]`` bounds the relative rounding error that sparse changes have left in the
    normaliser; reading :attr:`weights` sums it densely again (one pass) where that is not 0.
    """

    def __init__(
        self, logits: Tensor, weights: Tensor, log_norm: Tensor, norm_error: Tensor | None = None
    ) -> None:
        self.logits = logits
        self.log_norm = log_norm
        self.norm_error = torch.zeros_like(log_norm) if norm_error is None else norm_error
        self._weights = weights
        self._probs: Tensor | None = None
        self._weighted: Tensor | None = None
        self._cumulative: Tensor | None = None

    @classmethod
    def from_logits(cls, logits: Tensor) -> SoftmaxState:
        """Copy ``logits`` ``[S, K, n]`` (float) into a fresh state."""
        if logits.dim() != 3:
            raise ValueError(f"logits must be [seeds, contexts, actions], got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
        logits = logits.contiguous().clone()
        state = cls(logits, torch.empty_like(logits), torch.logsumexp(logits, -1, keepdim=True))
        state.refresh()
        return state

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    @property
    def weights(self) -> Tensor:
        """exp(logits), ``[S, K, n]`` (the state's own tensor: do not modify)."""
        if bool(self.norm_error.any()):
            self.log_norm = self._weights.sum(-1, keepdim=True).log_()
            self.norm_error.zero_()
        return self._weights

    @property
    def normaliser(self) -> Tensor:
        """Sum of the weights over actions, ``[S, K, 1]``."""
        return self.log_norm.exp()

    @property
    def probs(self) -> Tensor:
        """pi = weights / normaliser, ``[S, K, n]`` (a cached tensor: do not modify)."""
        if self._probs is None:
            self._probs = self.weights / self.normaliser
        return self._probs

    def head(self, seeds: int) -> SoftmaxState:
        """The first ``seeds`` seeds, as views of this state's tensors (for reading)."""
        weights = self.weights
        return SoftmaxState(self.logits[:seeds], weights[:seeds], self.log_norm[:seeds])

    def clone(self) -> SoftmaxState:
        state = SoftmaxState(
            self.logits.clone(), self._weights.clone(), self.log_norm.clone(), self.norm_error.clone()
        )
        state._weighted = None if self._weighted is None else self._weighted.clone()
        return state

    def refresh(self) -> None:
        """Recompute ``weights`` and ``log_norm`` after an in-place change of ``logits``: one dense pass.

        The logits are kept near log-probabilities (a row is shifted by its log normaliser when that
        drifts past ``REBASE``; a shift changes no probability), so ``exp(logits)`` needs no shift of its
        own and stays in range; a step that still overflows or underflows shifts the rows by their maxima.
        """
        self._settle(_shift_pass(self.logits.numel(), self.logits, self._weights, self._rebase_shift()))

    def step_along_probs(self, coefficient: Tensor) -> None:
        """``logits += coefficient * pi`` (``coefficient`` ``[S, K]``) and :meth:`refresh`, in one pass."""
        self.update_logits(_step_pass, coefficient.unsqueeze(-1) / self.normaliser)

    def update_logits(self, step: CompiledForLargeInputs[..., Tensor], *args: Tensor | float) -> None:
        """Change the logits with one dense pass ``step(logits, weights, *args, shift)`` that changes the
        logits in place, subtracts ``shift`` ``[S, K, 1]`` (see :meth:`refresh`), writes exp(logits) into
        the weights and returns their sums over actions ``[S, K, 1]``."""
        self._settle(step(self.logits.numel(), self.logits, self._weights, *args, self._rebase_shift()))

    def _drifted(self) -> Tensor:
        """Rows whose finite log normaliser is past ``REBASE``, bool ``[S, K, 1]``: their logits are shifted
        back to log-probabilities (a diverged row is left as it is, for the caller to detect)."""
        return torch.isfinite(self.log_norm) & (self.log_norm.abs() > REBASE)

    def _rebase_shift(self) -> Tensor:
        """Per-row shift of a dense pass, ``[S, K, 1]``: the log normaliser of the drifted rows, else 0."""
        return torch.where(self._drifted(), self.log_norm, 0.0)

    def _settle(self, total: Tensor) -> None:
        """Take ``log_norm`` from the sums ``[S, K, 1]`` of the weights a dense pass wrote (after an
        overflow or underflow, from the weights of the logits shifted by their row maxima)."""
        if not bool(((total > 0) & (total < math.inf)).all()):
            total = _shift_pass(
                self.logits.numel(), self.logits, self._weights, self.logits.amax(-1, keepdim=True)
            )
        self.log_norm = total.log_()
        self.norm_error.zero_()
        self._weighted = None
        self._probs = None

    def _rebase_rows(self) -> None:
        """Shift the drifted rows alone (after a sparse change) to log-probabilities, by their exact log
        normaliser, and sum their weights again."""
        drifted = self._drifted().squeeze(-1)
        if bool(drifted.any()):
            rows = self.logits[drifted]
            rows -= torch.logsumexp(rows, -1, keepdim=True)
            weights = rows.exp()
            self.logits[drifted] = rows
            self._weights[drifted] = weights
            self.log_norm[drifted] = weights.sum(-1, keepdim=True).log()
            self.norm_error[drifted] = 0.0

    def add_at(self, flat_actions: Tensor, contexts: Tensor, deltas: Tensor) -> None:
        """``logits[s, flat_actions[s, i]] += deltas[s, i]`` (repeated entries add up), in O(S B).

        The weights change at the distinct changed entries u alone, and the normaliser follows from them:
        Z' = Z + sum_u (w'_u - w_u). Its rounding adds about B eps (Z + sum_u w'_u) to the error that
        ``norm_error`` carries from earlier sparse steps; a row whose bound passes sqrt(machine epsilon)
        of Z' (a step that removed most of the mass, or overflowed exp) is summed densely instead, and a
        row whose normaliser drifted past ``REBASE`` is rebased.

        Args:
            flat_actions: context * n + action, and ``contexts``: int64 ``[S, B]``; deltas: ``[S, B]``.
        """
        seeds, contexts_n, n = self.shape
        flat_logits = self.logits.view(seeds, contexts_n * n)
        flat_weights = self._weights.view(seeds, contexts_n * n)
        entries, order = flat_actions.sort(1)
        entry_contexts = contexts.gather(1, order)
        distinct = torch.ones_like(entries, dtype=torch.bool)
        distinct[:, 1:] = entries[:, 1:] != entries[:, :-1]
        weights_before = flat_weights.gather(1, entries)
        flat_logits.scatter_add_(1, flat_actions, deltas)
        weights_after = flat_logits.gather(1, entries).exp()
        flat_weights.scatter_(1, entries, weights_after)
        total = self.normaliser.view(seeds, contexts_n)

        def per_context(values: Tensor) -> Tensor:
            """Sum over the distinct changed entries of each context, ``[S, K]``."""
            return torch.zeros_like(total).scatter_add(1, entry_contexts, torch.where(distinct, values, 0))

        new_total = total + per_context(weights_after - weights_before)
        eps = torch.finfo(total.dtype).eps
        error = self.norm_error.view(seeds, contexts_n) * total
        error += entries.shape[1] * eps * (total + per_context(weights_after))
        exact = (error <= math.sqrt(eps) * new_total) & (new_total < math.inf)
        self.norm_error = (error / new_total).unsqueeze(-1)
        log_norm = new_total.log_()
        resum = (~exact).nonzero(as_tuple=True)
        if resum[0].numel():
            log_norm[resum] = torch.logsumexp(self.logits[resum], -1)
            self.norm_error.view(seeds, contexts_n)[resum] = 0.0
        self.log_norm = log_norm.unsqueeze(-1)
        self._rebase_rows()
        self._weighted = None
        self._probs = None

    def log_probs(self) -> Tensor:
        """log pi, ``[S, K, n]``."""
        return self.logits - self.log_norm

    def log_probs_at(self, flat_actions: Tensor, contexts: Tensor) -> Tensor:
        """log pi of given (context, action) pairs of each seed.

        Args:
            flat_actions: ``context * n + action``, int64 ``[S, B]``; contexts: int64 ``[S, B]``.
        Returns: ``[S, B]``.
        """
        seeds, contexts_n, n = self.shape
        picked = self.logits.view(seeds, contexts_n * n).gather(1, flat_actions)
        return picked - self.log_norm.view(seeds, contexts_n).gather(1, contexts)

    def entropy(self) -> Tensor:
        """H = -sum_a pi_a log pi_a per seed and context, ``[S, K]`` (nats): one pass over the weights and
        logits, kept until the policy changes. The same pass sums the weights again where sparse changes
        left rounding in the normaliser."""
        # sum_a pi_a log pi_a = sum_a w_a logits_a / Z - log_norm, as the probabilities sum to 1
        if self._weighted is None:
            total, self._weighted = _entropy_pass(self.logits.numel(), self._weights, self.logits)
            if bool(self.norm_error.any()):
                self.log_norm = total.log_()
                self.norm_error.zero_()
        return (self.log_norm - self._weighted / self.normaliser).squeeze(-1)

    def sample(self, draws: int, generator: torch.Generator) -> Tensor:
        """``draws`` iid actions from each policy, int64 ``[S, K, draws]``.

        Inverse-CDF sampling: ``draws`` uniforms per row, then, chunk by chunk of rows, the running sums of
        the rows' weights (float64, in a buffer of at most ``SAMPLE_CHUNK`` elements, kept in cache) and a
        binary search for each uniform (see :func:`_inverse_cdf`). An action of weight 0 is never drawn.
        """
        seeds, contexts_n, n = self.shape
        weights = self._weights.view(seeds * contexts_n, n)  # exact: the running sums need no normaliser
        uniforms = torch.rand(weights.shape[0], draws, generator=generator, dtype=torch.float64)
        rows = max(1, min(SAMPLE_CHUNK // n, weights.shape[0]))  # a small policy's buffer is its size
        if self._cumulative is None or self._cumulative.shape != (rows, n):
            self._cumulative = torch.empty(rows, n, dtype=torch.float64)
        actions = torch.empty(uniforms.shape, dtype=torch.int64)
        for start in range(0, weights.shape[0], rows):
            part = slice(start, start + rows)
            chunk = weights[part]
            # float32 weights are widened by a copy first: cumsum(dtype=float64) widens into a fresh tensor
            source = chunk if chunk.dtype == torch.float64 else self._cumulative[: len(chunk)].copy_(chunk)
            cumulative = torch.cumsum(source, -1, out=self._cumulative[: len(chunk)])
            actions[part] = _inverse_cdf_pass(weights.numel(), cumulative, uniforms[part])
        return actions.view(seeds, contexts_n, draws)

    def entropy_gradient(self) -> Tensor:
        """dH/dlogits = -pi (log pi + H), ``[S, K, n]``; its negative is the paper's Q(a)."""
        return -self.probs * (self.log_probs() + self.entropy().unsqueeze(-1))
