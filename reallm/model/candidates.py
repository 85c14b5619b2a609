"""Phase 1's candidate configurations and the per-matrix choice among them (method.md §4, "Adaptive shape").

- :func:`candidate_configs`: the configurations a matrix is tried with: the base config alone, or the base
  config with each candidate's overrides of an :class:`reallm.model.adaptive.AdaptiveConfig`.
- :func:`select`: given every matrix's evaluated candidates (stored containers and their errors), one
  candidate per matrix: the exact MILP of `reallm.model.adaptive.choose` under the global bit budget (the trivial
  choice with a single configuration); each shared tensor (a decoder, a codebook) is charged to the
  matrices that use it. No Lightning: the autoencoder phase loads the candidates and stores the picks.
  Its steps, one function each: :func:`build_problem` (the MILP's data), :func:`solve` (the exact choice),
  :func:`summarise` (results.json's ``adaptive`` section), :func:`make_picks` (the chosen containers).
- :func:`check_budget`: before any candidate is encoded, the same problem's bits predicted from each candidate's
  config and matrix shape (`reallm.weight.layout`): a budget that no choice can meet is refused at once, with the
  numbers `solve` would give after encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from reallm.core.errors import UserError
from reallm.core.io import tensor_digest
from reallm.formats import get_codec
from reallm.formats.autoencoder import codec as ae_format
from reallm.formats.autoencoder.recipe import group_key
from reallm.model.adaptive import AdaptiveConfig, Candidate, Choice, choose, evaluate_fixed, fits, no_fit_message
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.layout import matrix_layout

__all__ = ["Pick", "Problem", "Selection", "build_problem", "candidate_configs", "check_budget", "make_picks", "select",
           "shared_group", "solve", "summarise"]


def _merge(base: CompressionConfig, overrides: dict[str, Any], label: str = "main") -> CompressionConfig:
    """The base config with a candidate's overrides, checked. The candidate's `options` are merged into the base's
    when it keeps the base's format; a candidate of another format starts from that format's default options."""
    changes = dict(overrides)
    merged = base.to_dict()
    if changes.get("quantizer", base.quantizer) != base.quantizer:
        merged["options"] = {}
    options = {**merged["options"], **(changes.pop("options", None) or {})}
    try:
        cfg = CompressionConfig.from_dict({**merged, **changes, "options": options})
        if cfg.quantizer == "autoencoder":
            ae_format.ae_spec(cfg)
        return cfg
    except (TypeError, ValueError) as e:
        raise UserError(f"configuration {label!r}: {e}") from None


def candidate_configs(base: CompressionConfig | None, adaptive: AdaptiveConfig | None) -> dict[str, CompressionConfig]:
    """label → configuration of every candidate of one matrix.

    Args:
        base: the matrix's config (None: the matrix is not compressed, no candidate).
        adaptive: the candidates' overrides; None or no candidates: the base config alone, labelled "main".
    Raises:
        UserError: a candidate's overrides make an invalid configuration (named by its label).
    """
    if base is None:
        return {}
    if adaptive is None or not adaptive.candidates:
        return {"main": _merge(base, {})}
    return {label: _merge(base, ov, label) for label, ov in adaptive.candidates.items()}


def _own_bits(weight: ReALLMWeight) -> tuple[float, float]:
    """(bits of the matrix without its shared tensors, bits of the shared tensors)."""
    shared = float(sum(t.numel() * t.element_size() * 8 for t in weight.shared.values()))
    numel = weight.shape[0] * weight.shape[1]
    return _split(weight.bits()["total"], shared, numel, weight.meta.get("shared_numel", numel))


def _split(total: float, shared: float, numel: int, shared_numel: int) -> tuple[float, float]:
    """(own bits, shared bits) of a matrix of `numel` weights whose `total` charges it numel / shared_numel of the
    `shared` bits: the one formula of the encoded (`_own_bits`) and the predicted (`check_budget`) problem."""
    return total - shared * (numel / shared_numel), shared


@dataclass
class Pick:
    """The chosen candidate of one matrix: its label, its container (``meta["shared_numel"]`` set to the
    weights of every matrix that picked the same shared tensors), its stats (with ``config`` and
    ``reason``) and the per-matrix record for results.json (config, reason, every candidate's bits and
    error, autoencoder group)."""

    label: str
    weight: ReALLMWeight
    stats: dict[str, Any]
    record: dict[str, Any]


@dataclass
class Selection:
    """One :class:`Pick` per matrix name (matrices without any candidate are absent) and, when a choice
    among several configurations was made, its summary for results.json (``adaptive``)."""

    picks: dict[str, Pick] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """Every matrix's candidates in the solver's terms (the input of `reallm.model.adaptive.choose`), with
    what turns a choice back into picks. Matrix m is the m-th matrix that has at least one candidate."""

    names: list[str]  # the matrices' names
    rows: list[list[Candidate]]  # [m][j]: label, own bits, objective term, shared resource id, info
    results: list[list[tuple[ReALLMWeight, dict[str, Any]]]]  # [m][j]: the candidate's container and stats
    numels: list[int]  # [m]: weights of the matrix (n_m)
    shared_costs: dict[str, float]  # shared resource id → its bits S_k (paid once)
    relative: bool  # objective Σ n_m ε² (else Σ ‖W − Ŵ‖², the "absolute" objective)
    error: Literal["weight", "output"]  # what ε measures

    @property
    def total_weights(self) -> float:
        return float(sum(self.numels))

    def budget_bits(self, adaptive: AdaptiveConfig) -> float:
        """The budget in bits: β bits per weight over every matrix."""
        return adaptive.budget * self.total_weights


def select(
    matrices: Sequence[tuple[str, Mapping[str, tuple[ReALLMWeight, dict[str, Any]]]]],
    labels: Sequence[str],
    adaptive: AdaptiveConfig | None,
    error: Literal["weight", "output"] = "weight",
) -> Selection:
    """One candidate per matrix: `build_problem`, then `solve` it and `summarise` the choice (several
    configurations under a budget) or take each matrix's only candidate, then `make_picks`.

    Args:
        matrices: per matrix, in order: (name, {label: (stored container, stats)}); stats hold
            ``rel_frobenius_error`` (‖W − Ŵ‖/‖W‖ of the stored container) and ``w_norm2`` (‖W‖², for the
            "absolute" objective), and with calibration ``rel_output_error`` (‖(W − Ŵ)X‖/‖WX‖) and
            ``out_norm2`` (‖WX‖²).
        labels: every configured candidate label (a shortened run may lack some candidates of some matrices).
        adaptive: the budget and objective; None, or a single label: every matrix takes its one candidate.
        error: "weight": the error term of a matrix is its weight error (relative objective n_m ε_m², absolute
            ‖W − Ŵ‖²); "output" (calibration-aware phase 1): its error on the calibration inputs (n_m ε_out²,
            or ‖(W − Ŵ)X‖² for the absolute objective), so that the choice minimises the layers' output error.
    Raises:
        UserError: no choice fits the budget (the message gives the cheapest total); ValueError: `error` is
            "output" and a candidate has no output error.
    """
    if error not in ("weight", "output"):
        raise ValueError(f"error must be 'weight' or 'output', got {error!r}")
    problem = build_problem(matrices, adaptive, error)
    out = Selection()
    if adaptive is not None and len(labels) > 1:
        choice = solve(problem, adaptive)
        picks, reasons = choice.picks, choice.reasons
        out.summary["adaptive"] = summarise(problem, labels, adaptive, choice)
    else:
        picks = [0] * len(problem.rows)
        reasons = ["the only configuration (no adaptive choice)"] * len(problem.rows)
    out.picks = make_picks(problem, picks, reasons)
    return out


def build_problem(
    matrices: Sequence[tuple[str, Mapping[str, tuple[ReALLMWeight, dict[str, Any]]]]],
    adaptive: AdaptiveConfig | None,
    error: Literal["weight", "output"] = "weight",
) -> Problem:
    """The MILP's data: per candidate its own bits (shared tensors excluded), its objective term and the
    shared resource it needs (one per distinct set of shared tensors, costed once). Arguments as in `select`.

    Raises:
        ValueError: a candidate lacks the error `error` asks for.
    """
    err_key, norm_key = ("rel_output_error", "out_norm2") if error == "output" else ("rel_frobenius_error", "w_norm2")
    rows: list[list[Candidate]] = []
    results: list[list[tuple[ReALLMWeight, dict[str, Any]]]] = []
    names: list[str] = []
    numels: list[int] = []
    shared_costs: dict[str, float] = {}
    relative = adaptive is None or adaptive.objective != "absolute"
    for name, found in matrices:
        row, res_row = [], []
        for label, (weight, stats) in found.items():
            own, shared_bits = _own_bits(weight)
            rid = None
            if weight.shared:  # one resource per distinct set of shared tensors
                rid = label + "|" + "|".join(tensor_digest(weight.shared[k]) for k in sorted(weight.shared))
                shared_costs[rid] = shared_bits
            numel = weight.shape[0] * weight.shape[1]
            if err_key not in stats:
                raise ValueError(f"candidate {label!r} of {name} has no {err_key} (the output error needs calibration)")
            err = stats[err_key]
            term = numel * err**2 if relative else stats.get(norm_key, 1.0) * err**2
            info = {"rel_frobenius_error": stats["rel_frobenius_error"], "numel": numel}
            if error == "output":  # what the reasons name
                info["rel_output_error"] = err
            row.append(Candidate(label, own, term, rid, info))
            res_row.append((weight, stats))
        if not row:
            continue
        rows.append(row)
        results.append(res_row)
        names.append(name)
        numels.append(numel)
    return Problem(names, rows, results, numels, shared_costs, relative, error)


def shared_group(config: CompressionConfig, name: str, blocks_prefix: str | None = None) -> str | None:
    """Which shared tensors the candidate `config` of matrix `name` uses, as phase 1 fits them: its autoencoder
    group (one decoder and latent codebook, `options.share`), the config itself for a format that shares tensors
    among all its matrices (`Codec.can_share`, e.g. vq's codebook_scope "model"), None when it shares nothing.
    `blocks_prefix`: the model's decoder blocks (for `share: type_blocks:K`)."""
    if config.quantizer == "autoencoder":
        return group_key(config, name, blocks_prefix)
    return config.key() if get_codec(config.quantizer).can_share(config) else None


def check_budget(
    matrices: Sequence[tuple[str, tuple[int, int], Mapping[str, CompressionConfig]]],
    adaptive: AdaptiveConfig | None,
    blocks_prefix: str | None = None,
) -> None:
    """Refuse, before any candidate is encoded, a budget that no choice can meet.

    The bits of every candidate follow from its config and its matrix's shape (`reallm.weight.layout`), exactly as
    `build_problem` reads them off the encoded containers: the same own bits, the same shared resources (one per
    label and `shared_group`, costing its tensors' bits once), so that `solve` would refuse the same budget after
    encoding, with the same numbers. Nothing is checked without a choice (no adaptive config, or one label).

    Args:
        matrices: per matrix, in order: (name, its shape (p, q), {label: config}: `candidate_configs`).
        adaptive: the budget.
        blocks_prefix: the model's decoder blocks (autoencoder groups of `share: type_blocks:K`).
    Raises:
        UserError: no choice fits: the budget and the cheapest total in bits, as `solve` words them.
    """
    labels = {label for _, _, cands in matrices for label in cands}
    if adaptive is None or len(labels) < 2:
        return
    rows, shared_costs, total_weights = _predicted_rows(matrices, blocks_prefix)
    budget = adaptive.budget * float(total_weights)
    if not fits(rows, budget, shared_costs, time_limit=adaptive.time_limit):
        detail = (f"{adaptive.budget:g} bits per weight over {total_weights} weights, from each candidate's config "
                  f"and matrix shape, before any was encoded")
        raise UserError(f"adaptive: {no_fit_message(rows, budget, shared_costs, detail)}")


def _predicted_rows(
    matrices: Sequence[tuple[str, tuple[int, int], Mapping[str, CompressionConfig]]], blocks_prefix: str | None,
) -> tuple[list[list[Candidate]], dict[str, float], int]:
    """(candidate rows, shared resource → its bits, weights of the matrices): `build_problem`'s bits, predicted.

    A resource is charged to the weights of every matrix whose candidate uses it, as phase 1's containers record
    it (``meta["shared_numel"]``), so that the own bits are the same floats as the encoded ones."""
    plan, users = [], {}
    for name, shape, cands in matrices:
        entries = []
        for label, cfg in cands.items():
            layout = matrix_layout(cfg, shape)
            rid = f"{label}|{shared_group(cfg, name, blocks_prefix)}" if layout.shared else None
            if rid is not None:
                users[rid] = users.get(rid, 0) + shape[0] * shape[1]
            entries.append((label, layout, rid))
        if entries:
            plan.append((shape[0] * shape[1], entries))
    rows, shared_costs = [], {}
    for numel, entries in plan:
        row = []
        for label, layout, rid in entries:
            sharers = users.get(rid, numel)
            own, shared = _split(layout.bits(sharers)["total"], float(layout.shared_bits()), numel, sharers)
            if rid is not None:
                shared_costs[rid] = shared
            row.append(Candidate(label, own, 0.0, rid))
        rows.append(row)
    return rows, shared_costs, sum(numel for numel, _ in plan)


def solve(problem: Problem, adaptive: AdaptiveConfig) -> Choice:
    """The exact choice under the budget (`reallm.model.adaptive.choose`, HiGHS MILP), with one reason per
    matrix. Raises UserError when no choice fits the budget."""
    try:
        return choose(problem.rows, problem.budget_bits(adaptive), problem.shared_costs,
                      time_limit=adaptive.time_limit, names=problem.names)
    except ValueError as e:
        raise UserError(f"adaptive: {e}") from None


def summarise(problem: Problem, labels: Sequence[str], adaptive: AdaptiveConfig, choice: Choice) -> dict[str, Any]:
    """results.json's ``adaptive`` section: the budget, objective and solver's status, the bits reached, the
    budget's price λ, what each single configuration would have given, and how many matrices took each."""
    total_weights, budget = problem.total_weights, problem.budget_bits(adaptive)
    rows, relative, error = problem.rows, problem.relative, problem.error
    singles = {}
    for label in labels:
        fx = evaluate_fixed(rows, label, problem.shared_costs)
        if fx is not None:
            singles[label] = {"bits_per_weight": fx["bits"] / total_weights, "objective": fx["objective"],
                              "fits_budget": fx["bits"] <= budget}
    return {
        "budget_bits_per_weight": adaptive.budget,
        "objective": ("sum of n_m * rel_err_m^2" if relative else "sum of ||W - W_hat||_F^2") if error == "weight"
        else ("sum of n_m * rel_output_err_m^2" if relative else "sum of ||(W - W_hat) X||_F^2"),
        "error": "relative output error on the calibration inputs" if error == "output"
        else "relative Frobenius error of the weight",
        "solver": "scipy.optimize.milp (HiGHS)", "status": choice.status, "mip_gap": choice.gap,
        "objective_value": choice.objective, "bits_per_weight": choice.total_bits / total_weights,
        "budget_price_lambda": choice.price,
        "candidates": dict(adaptive.candidates),
        "single_config": singles,
        "counts": {label: sum(1 for m, j in enumerate(choice.picks) if rows[m][j].label == label) for label in labels},
    }


def make_picks(problem: Problem, picks: Sequence[int], reasons: Sequence[str]) -> dict[str, Pick]:
    """matrix name → its :class:`Pick` (candidate `picks[m]` of matrix m, chosen for `reasons[m]`); each shared
    resource is charged to the matrices that use it (``meta["shared_numel"]`` of their containers)."""
    rows, results, numels = problem.rows, problem.results, problem.numels
    users: dict[str, int] = {}
    for m, j in enumerate(picks):
        if rows[m][j].shared is not None:
            users[rows[m][j].shared] = users.get(rows[m][j].shared, 0) + numels[m]
    out: dict[str, Pick] = {}
    for m, j in enumerate(picks):
        cand = rows[m][j]
        weight, stats = results[m][j]
        if cand.shared is not None:
            weight.meta["shared_numel"] = users[cand.shared]
        stats = dict(stats, config=cand.label, reason=reasons[m])
        stats.pop("w_norm2", None)
        stats.pop("out_norm2", None)
        record: dict[str, Any] = {
            "config": cand.label,
            "reason": reasons[m],
            "candidates": {c.label: {"own_bits_per_weight": c.bits / numels[m],
                                     **{k: st[k] for k in ("rel_frobenius_error", "rel_output_error") if k in st}}
                           for c, (_, st) in zip(rows[m], results[m])},
        }
        if stats.get("group"):
            record["group"] = stats["group"]
            record["group_size"] = stats.get("group_size")
        out[problem.names[m]] = Pick(cand.label, weight, stats, record)
    return out
