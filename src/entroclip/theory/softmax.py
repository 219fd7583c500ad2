"""Batched tabular softmax policies: logits with their exact normaliser and cached probabilities.

Shapes: ``[S, K, n]`` for S independent seeds, K contexts (states) and n actions. Entropies are in nats.
The lab works in the dtype of the logits (float64 by default) so that entropy changes of 1e-8 and finite
differences are resolved; :func:`entroclip.entropy.token_entropy` computes in float32 by design (it is
built for LLM vocabularies) and is the reference the tests hold these values to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest |log normaliser| tolerated before the logits of a row are shifted back to log-probabilities.
REBASE = 30.0


class SoftmaxState:
    """Policies softmax(logits): ``logits`` ``[S, K, n]``, ``log_norm`` = logsumexp(logits) ``[S, K, 1]``.

    Change the logits only through :meth:`refresh` (after an in-place dense change) or :meth:`add_at`
    (a sparse change, which keeps ``log_norm`` up to date without touching the other n - B entries).
    ``probs`` is cached and recomputed, with an exact normaliser, on first use after a sparse change.
    """

    def __init__(self, logits: Tensor, log_norm: Tensor, probs: Tensor | None = None) -> None:
        self.logits = logits
        self.log_norm = log_norm
        self._probs = torch.exp(logits - log_norm) if probs is None else probs
        self._probs_stale = False

    @classmethod
    def from_logits(cls, logits: Tensor) -> SoftmaxState:
        """Copy ``logits`` ``[S, K, n]`` (float) into a fresh state."""
        if logits.dim() != 3:
            raise ValueError(f"logits must be [seeds, contexts, actions], got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
        logits = logits.contiguous().clone()
        return cls(logits, torch.logsumexp(logits, -1, keepdim=True))

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    @property
    def probs(self) -> Tensor:
        """pi, ``[S, K, n]`` (a cached tensor: do not modify)."""
        if self._probs_stale:
            self.refresh()
        return self._probs

    def head(self, seeds: int) -> SoftmaxState:
        """The first ``seeds`` seeds, as views of this state's tensors (for reading)."""
        return SoftmaxState(self.logits[:seeds], self.log_norm[:seeds], self.probs[:seeds])

    def clone(self) -> SoftmaxState:
        return SoftmaxState(self.logits.clone(), self.log_norm.clone(), self.probs.clone())

    def refresh(self) -> None:
        """Recompute ``log_norm`` and ``probs`` after an in-place change of ``logits``.

        The logits are kept near log-probabilities (each row is shifted by its log normaliser when that
        drifts past ``REBASE``; a shift changes no probability), so ``exp(logits)`` needs no shift of its
        own and stays in range; a step that still overflows or underflows shifts the rows by their maxima.
        """
        if bool((self.log_norm.abs() > REBASE).any()):
            self.logits.sub_(self.log_norm)
            self.log_norm.zero_()
        probs = torch.exp(self.logits, out=self._probs)
        log_total = probs.sum(-1, keepdim=True).log_()
        self._probs_stale = False
        if not bool(torch.isfinite(log_total).all()):
            self.logits.sub_(self.logits.amax(-1, keepdim=True))
            torch.exp(self.logits, out=probs)
            log_total = probs.sum(-1, keepdim=True).log_()
        probs.div_(log_total.exp())
        self.log_norm = log_total

    def add_at(self, flat_actions: Tensor, contexts: Tensor, deltas: Tensor) -> None:
        """``logits[s, flat_actions[s, i]] += deltas[s, i]`` (repeated entries add up), in O(S B).

        The normaliser follows from the distinct changed entries u alone, in log space so that no step
        size can overflow it: Z' = Z (1 - sum_u pi_u) + sum_u exp(z'_u). A row whose normaliser shrank so
        much that the rounding error of 1 - sum_u pi_u would exceed sqrt(machine epsilon) of Z' is summed
        densely instead. ``probs`` is recomputed (densely, with an exact normaliser) on its next use.

        Args:
            flat_actions: context * n + action, and ``contexts``: int64 ``[S, B]``; deltas: ``[S, B]``.
        """
        seeds, contexts_n, n = self.shape
        flat_logits = self.logits.view(seeds, contexts_n * n)
        log_norm = self.log_norm.view(seeds, contexts_n)
        entries, order = flat_actions.sort(1)
        entry_contexts = contexts.gather(1, order)
        distinct = torch.ones_like(entries, dtype=torch.bool)
        distinct[:, 1:] = entries[:, 1:] != entries[:, :-1]
        probs_before = (flat_logits.gather(1, entries) - log_norm.gather(1, entry_contexts)).exp()
        flat_logits.scatter_add_(1, flat_actions, deltas)
        zeros = torch.zeros_like(log_norm)
        untouched = 1.0 - zeros.scatter_add(1, entry_contexts, torch.where(distinct, probs_before, 0.0))
        logits_after = torch.where(distinct, flat_logits.gather(1, entries), -math.inf)
        peak = torch.full_like(log_norm, -math.inf).scatter_reduce(1, entry_contexts, logits_after, "amax")
        changed = zeros.scatter_add(1, entry_contexts, (logits_after - peak.gather(1, entry_contexts)).exp())
        new_log_norm = torch.logaddexp(log_norm + untouched.clamp_min(0).log(), peak + changed.log())
        # The unchanged share carries an absolute rounding error of about B eps (relative to Z), i.e.
        # B eps Z / Z' relative to the new normaliser: rows where that exceeds sqrt(eps) are summed densely.
        eps = torch.finfo(untouched.dtype).eps
        shrink_limit = math.log(math.sqrt(eps) / (entries.shape[1] * eps))
        lost = (log_norm - new_log_norm > shrink_limit).nonzero(as_tuple=True)
        if lost[0].numel():
            new_log_norm[lost] = torch.logsumexp(self.logits[lost], -1)
        self.log_norm = new_log_norm.unsqueeze(-1)
        self._probs_stale = True

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
        """H = -sum_a pi_a log pi_a per seed and context, ``[S, K]`` (nats)."""
        # sum_a pi_a log pi_a = sum_a pi_a logits_a - log_norm, as the probabilities sum to 1
        weighted = torch.einsum("skn,skn->sk", self.probs, self.logits)
        return self.log_norm.squeeze(-1) - weighted

    def entropy_gradient(self) -> Tensor:
        """dH/dlogits = -pi (log pi + H), ``[S, K, n]``; its negative is the paper's Q(a)."""
        return -self.probs * (self.log_probs() + self.entropy().unsqueeze(-1))
