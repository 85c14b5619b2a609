"""Adaptive per-matrix configuration under a global bit budget (method.md §4, "Adaptive shape").

Every matrix m has candidate configurations c (autoencoder with a small latent and a large decoder,
autoencoder with a large latent and a small decoder, VQ without decoder, NF, ...), each with its
accounted bits B_mc and its error E_mc. Some candidates need a *shared* resource k (a decoder or a
codebook shared by several matrices) whose bits S_k are paid once if any matrix uses it. The choice
is the exact solution of the 0/1 program

    minimise    Σ_mc E_mc x_mc
    subject to  Σ_c x_mc = 1                      (one configuration per matrix)
                Σ_mc B_mc x_mc + Σ_k S_k y_k ≤ β Σ_m n_m   (global budget, β bits per weight)
                x_mc ≤ y_k(c)                      (a shared resource is paid when used)
                x, y ∈ {0, 1}

solved by HiGHS through ``scipy.optimize.milp`` (an exact branch and bound: the reported gap is the
solver's certified optimality gap, 0 when solved to optimality). The LP relaxation's dual price of the
budget, λ (error per bit), explains each choice: a better candidate is not taken when its error
reduction per extra bit is below λ.

The objective used by the phase is E_mc = n_m · ε_mc² (ε = relative Frobenius error ‖W − Ŵ‖/‖W‖):
the sum over all weights of the squared relative error of their matrix, i.e. every weight counts
equally and each matrix is measured against its own scale (a layer's output perturbation relative to
its output is ≈ ε for isotropic inputs, whatever the layer's norm).

Pure functions, no torch: :func:`choose` (MILP), :func:`fits` (whether any choice meets the budget, without
errors: the check before encoding), :func:`brute_force` (for tests), :func:`lp_price`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AdaptiveConfig", "Candidate", "Choice", "brute_force", "cheapest_bits", "choose", "evaluate_fixed", "fits",
           "lp_price", "no_fit_message"]


@dataclass
class AdaptiveConfig:
    """Adaptive choice of one configuration per matrix (phase 1).

    Args:
        budget: accounted bits per weight over all compressed matrices (every stored piece counted:
            codes, codebooks, scales, permutations, latent codes and codebooks, decoders, low-rank
            factors, DoRA magnitudes; shared pieces once).
        candidates: label → overrides of the phase's base compression config. A candidate's `options` are
            merged into the base's when it keeps the base's format; a candidate of another format starts from that
            format's default options
            (`reallm.model.candidates`). Every candidate is evaluated on every
            matrix with the full recipe (autoencoder candidates are trained by the phase's epochs),
            so the errors the solver sees are exactly those of the stored result.
        objective: "relative" minimises Σ n_m ε_m² (see the module docstring); "absolute" minimises
            Σ ‖W_m − Ŵ_m‖²_F.
        time_limit: seconds allowed to the MILP solver (None: no limit).
        error: what ε measures: "weight" (‖W − Ŵ‖ / ‖W‖), "output" (‖(W − Ŵ)X‖ / ‖WX‖ on the calibration
            inputs; needs calibration-aware phase 1), or "auto" (output when phase 1 is calibration-aware, weight
            otherwise).
    """

    budget: float = 3.25
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    objective: str = "relative"
    time_limit: float | None = 60.0
    error: str = "auto"

    def __post_init__(self) -> None:
        if self.error not in ("auto", "weight", "output"):
            raise ValueError(f"adaptive.error must be 'auto', 'weight' or 'output', got {self.error!r}")


@dataclass
class Candidate:
    """One configuration for one matrix.

    label: the candidate's name; bits: the matrix's own stored bits under it (shared pieces
    excluded); error: its objective term; shared: id of the shared resource it needs (or None);
    info: anything to carry along (e.g. the relative error for the report).
    """

    label: str
    bits: float
    error: float
    shared: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Choice:
    """The solution: index of the chosen candidate per matrix, the shared resources paid, totals,
    solver status, its certified relative gap, the budget's LP price λ and one reason per matrix."""

    picks: list[int]
    used_shared: list[str]
    total_bits: float
    objective: float
    status: str
    gap: float
    price: float | None
    reasons: list[str] = field(default_factory=list)


def _validate(cands: Sequence[Sequence[Candidate]], shared_costs: dict[str, float]) -> None:
    if not cands:
        raise ValueError("no matrices to choose for")
    for m, row in enumerate(cands):
        if not row:
            raise ValueError(f"matrix {m} has no candidate")
        for c in row:
            if c.shared is not None and c.shared not in shared_costs:
                raise ValueError(f"candidate {c.label!r} of matrix {m} needs unknown shared resource {c.shared!r}")
            if not (math.isfinite(c.bits) and math.isfinite(c.error)):
                raise ValueError(f"candidate {c.label!r} of matrix {m} has non-finite bits or error")


def cheapest_bits(cands: Sequence[Sequence[Candidate]], shared_costs: dict[str, float]) -> float:
    """The total of the choice that takes each matrix's cheapest candidate (its own bits plus its shared resource's
    whole cost), shared costs paid once: the "cheapest choice" `no_fit_message` quotes. It is the total of a
    feasible choice, so a budget of at least this many bits fits."""
    total, used = 0.0, set()
    for row in cands:
        c = min(row, key=lambda c: c.bits + (shared_costs.get(c.shared, 0.0) if c.shared else 0.0))
        total += c.bits
        if c.shared:
            used.add(c.shared)
    return total + sum(shared_costs[k] for k in used)


def _program(cands, budget_bits, shared_costs, relax: bool):
    keys = sorted(shared_costs)
    kidx = {k: i for i, k in enumerate(keys)}
    flat = [(m, j, c) for m, row in enumerate(cands) for j, c in enumerate(row)]
    nx, ny = len(flat), len(keys)
    err_scale = max(1e-300, max(abs(c.error) for _, _, c in flat))
    bit_scale = max(1.0, max(c.bits for _, _, c in flat), *(shared_costs.values() or [1.0]))
    # tie-break towards fewer bits with a weight far below any error difference that matters
    eps = 1e-9 * err_scale / bit_scale
    cost = np.array([c.error + eps * c.bits for _, _, c in flat] + [eps * shared_costs[k] for k in keys])
    rows_eq = np.zeros((len(cands), nx + ny))
    for i, (m, _, _) in enumerate(flat):
        rows_eq[m, i] = 1.0
    budget_row = np.array([c.bits for _, _, c in flat] + [shared_costs[k] for k in keys])[None, :]
    link = [(i, kidx[c.shared]) for i, (_, _, c) in enumerate(flat) if c.shared is not None]
    rows_link = np.zeros((len(link), nx + ny))
    for r, (i, k) in enumerate(link):
        rows_link[r, i], rows_link[r, nx + k] = 1.0, -1.0
    return flat, keys, cost, rows_eq, budget_row, rows_link


def lp_price(cands: Sequence[Sequence[Candidate]], budget_bits: float,
             shared_costs: dict[str, float] | None = None) -> float | None:
    """λ ≥ 0, the LP relaxation's dual price of the budget (objective decrease per extra bit);
    None when the relaxation cannot be solved."""
    from scipy.optimize import linprog

    shared_costs = dict(shared_costs or {})
    _, _, cost, rows_eq, budget_row, rows_link = _program(cands, budget_bits, shared_costs, True)
    A_ub = np.vstack([budget_row, rows_link]) if len(rows_link) else budget_row
    b_ub = np.concatenate([[budget_bits], np.zeros(len(rows_link))])
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=rows_eq, b_eq=np.ones(len(cands)), bounds=(0, 1), method="highs")
    if res.status != 0:
        return None
    return float(-res.ineqlin.marginals[0])


def choose(
    cands: Sequence[Sequence[Candidate]],
    budget_bits: float,
    shared_costs: dict[str, float] | None = None,
    *,
    time_limit: float | None = 60.0,
    names: Sequence[str] | None = None,
) -> Choice:
    """Exact choice of one candidate per matrix minimising Σ error with total bits ≤ ``budget_bits``.

    Args:
        cands: per matrix, its candidates.
        budget_bits: total bit budget (e.g. β · Σ n_m).
        shared_costs: resource id → bits, paid once when any chosen candidate needs it.
        time_limit: solver time limit in seconds; on timeout the best solution found is returned with
            its certified gap.
        names: matrix names, used in the reasons.
    Raises:
        ValueError: no feasible choice (`no_fit_message`: the budget and `cheapest_bits`).
    """
    shared_costs = dict(shared_costs or {})
    _validate(cands, shared_costs)
    flat, res = _milp(cands, budget_bits, shared_costs, time_limit)
    if res.x is None:
        raise ValueError(no_fit_message(cands, budget_bits, shared_costs, f"solver: {res.message}"))
    x = np.round(res.x).astype(int)
    picks = [-1] * len(cands)
    for i, (m, j, _) in enumerate(flat):
        if x[i]:
            picks[m] = j
    used = sorted({cands[m][j].shared for m, j in enumerate(picks) if cands[m][j].shared is not None})
    total = sum(cands[m][j].bits for m, j in enumerate(picks)) + sum(shared_costs[k] for k in used)
    objective = sum(cands[m][j].error for m, j in enumerate(picks))
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    status = "optimal" if res.status == 0 else ("time_limit" if res.status == 1 else f"status {res.status}")
    price = lp_price(cands, budget_bits, shared_costs)
    choice = Choice(picks, used, float(total), float(objective), status, gap, price)
    choice.reasons = explain(cands, choice, shared_costs, budget_bits, names)
    return choice


def fits(cands: Sequence[Sequence[Candidate]], budget_bits: float, shared_costs: dict[str, float] | None = None,
         *, time_limit: float | None = 60.0) -> bool:
    """Whether some choice meets the budget: `choose`'s program and solver on the same bits (the errors play no
    part in it), so that the budgets refused before encoding are exactly those `choose` refuses after it."""
    shared_costs = dict(shared_costs or {})
    _validate(cands, shared_costs)
    return _milp(cands, budget_bits, shared_costs, time_limit)[1].x is not None


def no_fit_message(cands: Sequence[Sequence[Candidate]], budget_bits: float, shared_costs: dict[str, float],
                   detail: str) -> str:
    """The line saying that no choice fits: the budget and `cheapest_bits`, in whole bits, then `detail`."""
    return (f"no configuration fits the budget of {budget_bits:.0f} bits (the cheapest choice needs about "
            f"{cheapest_bits(cands, shared_costs):.0f} bits; {detail})")


def _milp(cands, budget_bits: float, shared_costs: dict[str, float], time_limit: float | None):
    """(flat candidates (m, j, c), scipy's result) of the 0/1 program of the module docstring (HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    flat, _, cost, rows_eq, budget_row, rows_link = _program(cands, budget_bits, shared_costs, False)
    constraints = [LinearConstraint(rows_eq, 1.0, 1.0), LinearConstraint(budget_row, -np.inf, budget_bits)]
    if len(rows_link):
        constraints.append(LinearConstraint(rows_link, -np.inf, 0.0))
    options = {"time_limit": time_limit} if time_limit else {}
    res = milp(cost, constraints=constraints, integrality=np.ones(len(cost)), bounds=Bounds(0, 1), options=options)
    return flat, res


def explain(cands, choice: Choice, shared_costs: dict[str, float], budget_bits: float,
            names: Sequence[str] | None = None) -> list[str]:
    """One sentence per matrix: what was chosen and why the lower-error alternative was not.

    Uses ``info["rel_output_error"]`` (calibration-aware choice) or ``info["rel_frobenius_error"]`` and
    ``info["numel"]`` of the candidates when present (relative errors and bits per weight), else the raw
    objective terms and bits."""
    reasons = []
    lam = choice.price

    def show(c: Candidate) -> str:
        n = c.info.get("numel")
        if "rel_output_error" in c.info:
            err = f"rel. output error {c.info['rel_output_error']:.4f}"
        elif "rel_frobenius_error" in c.info:
            err = f"rel. error {c.info['rel_frobenius_error']:.4f}"
        else:
            err = f"error {c.error:.4g}"
        bits = f"{c.bits / n:.3f} own bits/weight" if n else f"{c.bits:.0f} own bits"
        return f"{err} at {bits}" + (" + its share of the shared pieces" if c.shared else "")

    for m, j in enumerate(choice.picks):
        row = cands[m]
        c = row[j]
        best = min(range(len(row)), key=lambda k: (row[k].error, row[k].bits))
        head = f"{c.label}: {show(c)}"
        if best == j:
            reasons.append(f"{head}; the lowest error of the {len(row)} candidates")
            continue
        b = row[best]
        d_err = c.error - b.error
        extra = shared_costs.get(b.shared, 0.0) if b.shared and b.shared not in choice.used_shared else 0.0
        d_bits = b.bits - c.bits + extra
        if d_bits <= 0:
            why = "its shared pieces would be paid for too few matrices"
        elif lam is not None and lam > 0:
            why = (f"its error reduction per extra bit ({d_err / d_bits:.3g}) is below the budget's price "
                   f"λ = {lam:.3g} (the bits lower the total error more elsewhere)")
        else:
            why = "the budget cannot fund the extra bits"
        n = b.info.get("numel")
        more = f"{d_bits / n:+.3f} bits/weight" if n else f"{d_bits:+.0f} bits"
        reasons.append(f"{head}; {b.label} ({show(b).split(' at ')[0]}) would cost {more}: {why}")
    return reasons


def brute_force(cands: Sequence[Sequence[Candidate]], budget_bits: float,
                shared_costs: dict[str, float] | None = None) -> tuple[float, list[int]] | None:
    """Exhaustive search (tests only): (best objective, picks) or None if nothing fits."""
    shared_costs = dict(shared_costs or {})
    best: tuple[float, list[int]] | None = None
    for picks in itertools.product(*[range(len(r)) for r in cands]):
        used = {cands[m][j].shared for m, j in enumerate(picks) if cands[m][j].shared is not None}
        bits = sum(cands[m][j].bits for m, j in enumerate(picks)) + sum(shared_costs[k] for k in used)
        if bits > budget_bits * (1 + 1e-12):
            continue
        obj = sum(cands[m][j].error for m, j in enumerate(picks))
        if best is None or obj < best[0] - 1e-15:
            best = (obj, list(picks))
    return best


def evaluate_fixed(cands: Sequence[Sequence[Candidate]], label: str,
                   shared_costs: dict[str, float] | None = None) -> dict[str, float] | None:
    """Bits and objective if every matrix took candidate ``label`` (None if some matrix lacks it)."""
    shared_costs = dict(shared_costs or {})
    picks = []
    for row in cands:
        hit = [c for c in row if c.label == label]
        if not hit:
            return None
        picks.append(hit[0])
    used = {c.shared for c in picks if c.shared is not None}
    return {"bits": sum(c.bits for c in picks) + sum(shared_costs[k] for k in used),
            "objective": sum(c.error for c in picks)}
