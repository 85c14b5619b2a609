"""The adaptive per-matrix choice under a global bit budget (reallm.model.adaptive): the MILP against brute
force, shared resources paid once, infeasible budgets, and reasons."""

from __future__ import annotations

import random

import pytest

from reallm.formats.autoencoder.recipe import assign_groups
from reallm.model.adaptive import Candidate, brute_force, choose, evaluate_fixed, lp_price


def random_instance(seed: int, n_matrices: int = 5, n_cands: int = 4, with_shared: bool = True):
    rng = random.Random(seed)
    shared = {"dec_a": rng.uniform(500, 3000), "cb_b": rng.uniform(100, 800)} if with_shared else {}
    rows = []
    for _ in range(n_matrices):
        n = rng.choice([1024, 2048, 4096])
        row = []
        for c in range(n_cands):
            bits = n * rng.uniform(1.5, 4.5)
            err = n * 2 ** (-2 * bits / n) * rng.uniform(0.6, 1.4)  # roughly rate-distortion shaped
            res = rng.choice([None, "dec_a", "cb_b"]) if with_shared else None
            row.append(Candidate(f"c{c}", bits, err, res, {"numel": n}))
        rows.append(row)
    return rows, shared


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force(seed):
    rows, shared = random_instance(seed, with_shared=seed % 3 != 0)
    total_n = sum(r[0].info["numel"] for r in rows)
    for beta in (2.5, 3.0, 3.5, 5.0):
        budget = beta * total_n
        bf = brute_force(rows, budget, shared)
        if bf is None:
            with pytest.raises(ValueError, match="no configuration fits"):
                choose(rows, budget, shared)
            continue
        ch = choose(rows, budget, shared)
        assert ch.status == "optimal"
        assert ch.objective == pytest.approx(bf[0], rel=1e-9)
        assert ch.total_bits <= budget * (1 + 1e-9)
        # the totals are recomputed from the picks: shared pieces paid once, only when used
        used = {rows[m][j].shared for m, j in enumerate(ch.picks)} - {None}
        assert set(ch.used_shared) == used
        assert ch.total_bits == pytest.approx(sum(rows[m][j].bits for m, j in enumerate(ch.picks))
                                              + sum(shared[k] for k in used))
        assert len(ch.reasons) == len(rows) and all(r.startswith(rows[m][j].label)
                                                    for m, (j, r) in enumerate(zip(ch.picks, ch.reasons)))


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_best_single_configuration(seed):
    rows, shared = random_instance(seed + 100)
    singles = [evaluate_fixed(rows, f"c{c}", shared) for c in range(4)]
    for budget in sorted(s["bits"] for s in singles):  # each single configuration just fits
        feasible = [s["objective"] for s in singles if s["bits"] <= budget]
        assert choose(rows, budget, shared).objective <= min(feasible) * (1 + 1e-12)


def test_shared_resource_paid_once_and_only_when_worth_it():
    # two matrices; candidate "ae" is better but needs a decoder of 1000 bits, paid once for both
    rows = [[Candidate("vq", 300, 10.0), Candidate("ae", 300, 6.0, "dec")] for _ in range(2)]
    assert choose(rows, 1600, {"dec": 1000}).picks == [1, 1]  # 600 + 1000 fits
    assert choose(rows, 1599, {"dec": 1000}).picks == [0, 0]  # it does not: no decoder at all
    ch = choose(rows, 1599, {"dec": 1000})
    assert ch.used_shared == [] and ch.total_bits == 600


def test_extremes_and_price():
    rows, shared = random_instance(7, with_shared=False)
    total_n = sum(r[0].info["numel"] for r in rows)
    rich = choose(rows, 100 * total_n, shared)
    assert rich.picks == [min(range(4), key=lambda k: (r[k].error, r[k].bits)) for r in rows]
    assert all("lowest error" in r for r in rich.reasons)
    assert lp_price(rows, 100 * total_n) == pytest.approx(0.0, abs=1e-12)  # the budget does not bind
    cheapest = sum(min(c.bits for c in r) for r in rows)
    poor = choose(rows, cheapest, shared)
    assert poor.picks == [min(range(4), key=lambda k: r[k].bits) for r in rows]
    mid = choose(rows, 3.0 * total_n)
    if mid.price is not None and mid.price > 0:
        assert any("price" in r for r in mid.reasons)


def test_infeasible_and_invalid_inputs():
    rows = [[Candidate("a", 100, 1.0)]]
    with pytest.raises(ValueError, match="cheapest choice needs about 100"):
        choose(rows, 50)
    with pytest.raises(ValueError, match="unknown shared resource"):
        choose([[Candidate("a", 1, 1.0, "x")]], 10)
    with pytest.raises(ValueError, match="no candidate"):
        choose([[]], 10)


def test_assign_groups_balances_devices():
    costs = {f"g{i}": float(c) for i, c in enumerate([9, 7, 6, 5, 5, 4, 3, 2, 2, 1])}
    owner = assign_groups(costs, 3)
    loads = [sum(c for g, c in costs.items() if owner[g] == r) for r in range(3)]
    assert set(owner.values()) == {0, 1, 2} and max(loads) <= 4 / 3 * sum(costs.values()) / 3 + max(costs.values())
    assert assign_groups(costs, 3) == owner  # deterministic: every device computes the same
    assert set(assign_groups(costs, 1).values()) == {0}


def _stored_candidates():
    """Three real matrices, each compressed two ways: NF3 (own tensors only) and 2-bit VQ with one
    codebook shared by the three (model scope), as the autoencoder phase stores them."""
    import torch

    from reallm import CompressionConfig, compress_weight
    from reallm.model.surgery import fit_shared_tensors
    from reallm.weight.pipeline import relative_error

    torch.manual_seed(0)
    layers = {f"layers.{i}.proj": torch.nn.Linear(q, p, bias=False) for i, (p, q) in
              enumerate([(64, 64), (64, 128), (128, 64)])}
    nf3 = CompressionConfig(quantizer="nf", bits=3)
    vq2 = CompressionConfig(quantizer="vq", bits=2,
                            options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 3})
    (tensors, numel), = fit_shared_tensors([(n, m, vq2) for n, m in layers.items()], progress=False).values()
    matrices = []
    for name, layer in layers.items():
        W = layer.weight.detach()
        found = {}
        for label, cfg, shared in (("nf3", nf3, None), ("vq2", vq2, tensors)):
            weight = compress_weight(W, cfg, name=name, shared=shared, shared_numel=numel if shared else None)
            found[label] = (weight, {"rel_frobenius_error": relative_error(W, weight.dequantize()),
                                     "w_norm2": float(W.square().sum())})
        matrices.append((name, found))
    return matrices, numel


@pytest.mark.parametrize("beta", [2.0, 2.3, 2.9, 3.2])  # infeasible, all vq2, mixed, all nf3
def test_select_is_the_brute_force_choice_and_charges_shared_tensors(beta):
    """reallm.model.candidates.select over stored containers: the same picks as brute force over the rows
    computed by hand (own bits = total - share of the codebook, error term n * rel_err^2, the codebook's
    bits paid once), and every matrix that picked the shared codebook is charged by the weights of exactly
    those matrices (meta["shared_numel"])."""
    from reallm.model.adaptive import AdaptiveConfig
    from reallm.model.candidates import select

    matrices, numel = _stored_candidates()
    codebook_bits = sum(t.numel() * t.element_size() * 8
                        for t in matrices[0][1]["vq2"][0].shared.values())
    rows = []
    for _, found in matrices:
        row = []
        for label, (weight, stats) in found.items():
            n = weight.shape[0] * weight.shape[1]
            own = weight.bits()["total"] - (codebook_bits * n / numel if weight.shared else 0.0)
            row.append(Candidate(label, own, n * stats["rel_frobenius_error"] ** 2, "cb" if weight.shared else None))
        rows.append(row)
    budget = beta * numel
    best = brute_force(rows, budget, {"cb": codebook_bits})
    adaptive = AdaptiveConfig(budget=beta, candidates={"nf3": {}, "vq2": {}})
    if best is None:
        with pytest.raises(Exception, match="no configuration fits"):
            select(matrices, ["nf3", "vq2"], adaptive)
        return
    out = select(matrices, ["nf3", "vq2"], adaptive)
    assert [out.picks[name].label for name, _ in matrices] == [rows[m][j].label for m, j in enumerate(best[1])]
    assert out.summary["adaptive"]["objective_value"] == pytest.approx(best[0], rel=1e-9)
    users = sum(p.weight.shape[0] * p.weight.shape[1] for p in out.picks.values() if p.label == "vq2")
    for pick in out.picks.values():
        assert pick.stats["config"] == pick.label and "w_norm2" not in pick.stats and pick.record["reason"]
        if pick.label == "vq2":
            assert pick.weight.meta["shared_numel"] == users


def test_select_without_a_choice_takes_the_one_candidate():
    from reallm.model.candidates import select

    matrices, _ = _stored_candidates()
    only = [(name, {"vq2": found["vq2"]}) for name, found in matrices]
    out = select(only, ["vq2"], None)
    assert [p.label for p in out.picks.values()] == ["vq2"] * 3 and out.summary == {}
    assert {p.weight.meta["shared_numel"] for p in out.picks.values()} == {64 * 64 + 2 * 64 * 128}
