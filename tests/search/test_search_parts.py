"""The pieces of pymerge.search against independent references: top-k against pymerge.ops, the per-task
contributions against pymerge.ops.ties / task_arithmetic and a float64 transcription of PCB-ES (pcb_ES.py),
NPS bins and masks, one Evolver step rebuilt from its documented rules, the builtin ES, input checks."""

from __future__ import annotations

import pytest
import torch

from pymerge import ops, search
from pymerge.errors import ConfigError, MergeError
from pymerge.ops.philox import keep_mask
from pymerge.search.contributions import pcb, ties
from pymerge.search.nps import magnitude_bins
from pymerge.search.optimizers import OnePlusLambdaES
from pymerge.search.task_vectors import TaskVectors, topk_keep

F64 = torch.float64
SHAPES = {"a.weight": (13, 7), "b.bias": (5,), "c.weight": (3, 11)}


def _family(seed: int, n: int = 3, integer: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["step"] = torch.tensor(7)  # non-float: passed through
    experts = []
    for _ in range(n):
        if integer:  # many equal magnitudes: ties at every threshold
            e = {k: base[k] + torch.randint(-2, 3, s, generator=g).float() / 8 for k, s in SHAPES.items()}
        else:
            e = {k: base[k] + torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}
        e["step"] = torch.tensor(1)
        experts.append(e)
    return base, experts


@pytest.mark.parametrize("k", [0, 1, 17, 40, 41, 91])
def test_topk_keep_matches_ops_topk_mask(k):
    x = torch.randint(-3, 4, (91,)).float()  # heavy ties
    assert torch.equal(topk_keep(x, k), ops.topk_mask(x, k))


def test_task_vectors_layout_and_passthrough():
    base, experts = _family(0)
    tv = TaskVectors(base, experts, exclude=[r"^c\."])
    assert tv.names == ["a.weight", "b.bias"] and tv.numel == 13 * 7 + 5
    delta = torch.arange(tv.numel, dtype=torch.float32)
    sd = tv.state_dict(delta)
    assert list(sd) == list(base)
    assert torch.equal(sd["a.weight"], base["a.weight"] + delta[:91].reshape(13, 7))
    assert sd["c.weight"] is base["c.weight"] and sd["step"] is base["step"]
    assert torch.equal(tv.tau[1][91:], experts[1]["b.bias"] - base["b.bias"])


def test_task_vectors_errors():
    base, experts = _family(0)
    experts[1]["a.weight"] = torch.zeros(7, 13)
    with pytest.raises(MergeError, match=r"'a\.weight' of expert 1 has shape \[7, 13\]"):
        TaskVectors(base, experts)
    del experts[2]["c.weight"]
    with pytest.raises(MergeError, match=r"expert 1 has no tensor 'c\.weight'"):
        TaskVectors(base, [experts[0], experts[2]])
    with pytest.raises(ConfigError, match="no floating-point tensors"):
        TaskVectors(base, experts, exclude=["."])


def test_ties_contributions_are_ops_ties_at_unit_lambda():
    base, experts = _family(1, n=4, integer=True)
    tv = TaskVectors(base, experts)
    merged = tv.state_dict(ties(tv, 0.3).sum(0))
    for name in SHAPES:
        want = ops.ties(base[name], [e[name] for e in experts], [1.0] * 4, [0.3] * 4)
        assert torch.allclose(merged[name], want, rtol=0, atol=1e-6), name


def test_lambda_search_candidate_is_task_arithmetic_with_those_weights():
    base, experts = _family(2)
    seen = []
    result = search.lambda_search(base, experts, lambda sd: seen.append(sd) or 0.0, method="task_arithmetic",
                                  budget=9, popsize=4, optimizer="builtin", seed=0)
    for trial, sd in zip(result.history, seen):
        lams = trial.params["lambdas"]
        for name in SHAPES:
            want = ops.task_arithmetic(base[name], [e[name] for e in experts], lams)
            assert torch.allclose(sd[name], want, rtol=0, atol=1e-6)
    assert result.history[0].params["lambdas"] == [1 / 3] * 3  # the start is plain averaging


def pcb_es_oracle(tau: torch.Tensor, lambdas, ratio: float) -> torch.Tensor:
    """pcb_ES.py (PCB + compute_acc's merge) transcribed in float64 on the flat [tasks, D] task vectors."""
    tau = tau.to(F64)
    n, d = tau.shape

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio, max_ratio):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    a = clamp(tau.abs(), 0.01, 0.01)
    clamped = torch.sign(tau) * a
    normed = torch.sign(tau) * normalize(a)
    intra = torch.exp(n * normalize(a) ** 2)
    inter = torch.vstack([torch.tanh(normed[i] * normed).sum(0) for i in range(n)])
    scale = normalize(clamp(intra * inter, 1 - ratio, 0))
    tvs = clamped * torch.tensor(lambdas, dtype=F64).unsqueeze(1)
    return (tvs * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_pcb_contributions_match_pcb_es_oracle(ratio):
    base, experts = _family(3)
    tv = TaskVectors(base, experts)
    k = pcb(tv, ratio)
    lams = [0.8, 1.3, 1.1]
    ours = sum(lam * k[t] for t, lam in enumerate(lams))
    ref = pcb_es_oracle(tv.tau, lams, ratio)
    assert torch.allclose(ours.to(F64), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert int((k != 0).any(0).sum()) < tv.numel  # the balanced-score threshold dropped something


def test_nps_bins_and_start_is_magnitude_pruning():
    base, experts = _family(4)
    tv = TaskVectors(base, experts)
    ids = magnitude_bins(tv.tau, 4)
    d = tv.numel
    for t in range(tv.count):  # 4 rank intervals of (almost surely distinct) magnitudes
        order = torch.argsort(tv.tau[t].abs())
        expect = torch.zeros(d, dtype=torch.int64)
        for m in range(1, 4):
            expect[order[(m * d) // 4:]] += 1
        assert torch.equal(ids[t], expect)
    seen = []
    result = search.nps(base, experts, lambda sd: seen.append(sd) or 0.0, keep=0.25, bins=4, budget=1,
                        optimizer="builtin")
    assert result.evaluations == 1
    k = round(0.25 * d)
    delta = sum(tv.tau[t] * ops.topk_mask(tv.tau[t], k) for t in range(3))
    want = tv.state_dict(delta)
    for name in SHAPES:
        assert torch.allclose(seen[0][name], want[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rescale_bins,normalize", [(False, False), (True, True)])
def test_nps_candidates_follow_the_documented_rule(rescale_bins, normalize):
    """Every candidate: keep the top-k of |tau| * w[bin] (ops.topk_mask), scale by w when rescale_bins,
    sum with lambdas (divided by their sum when normalize)."""
    base, experts = _family(5, n=2)
    tv = TaskVectors(base, experts)
    ids = magnitude_bins(tv.tau, 3)
    seen = []
    result = search.nps(base, experts, lambda sd: seen.append(tv._flat(sd) - tv.base) or float(len(seen) % 5),
                        keep=0.3, bins=3, budget=9, popsize=4, optimizer="builtin", seed=2,
                        rescale_bins=rescale_bins, normalize=normalize)
    k = round(0.3 * tv.numel)
    changed = 0
    for trial, got in zip(result.history, seen):
        w = torch.tensor(trial.params["bin_weights"])
        lams = trial.params["lambdas"]
        want = torch.zeros(tv.numel)
        for t in range(2):
            wt = w[t][ids[t]]
            pruned = tv.tau[t] * ops.topk_mask(tv.tau[t].abs() * wt, k)
            want += lams[t] * (pruned * wt if rescale_bins else pruned)
        if normalize:
            want /= sum(lams)
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
        plain = sum(tv.tau[t] * ops.topk_mask(tv.tau[t], k) for t in range(2))
        changed += int(not torch.equal((got != 0), (plain != 0)))
    assert changed > 0  # some candidate's bin weights moved the kept set away from magnitude pruning


def test_evolver_first_candidate_follows_the_documented_rules():
    base, experts = _family(6)
    seen = []
    search.evolver(base, experts, lambda sd: seen.append(sd) or 0.0, generations=1, seed=11)
    tv = TaskVectors(base, experts)
    gen = torch.Generator().manual_seed(11)
    i = torch.randperm(3, generator=gen).tolist()[0]
    r = int(torch.randint(2, (), generator=gen))
    ref = r if r < i else r + 1
    mutant = 0.5 * tv.tau[i] + 0.5 * tv.tau[ref]
    cand = torch.where(keep_mask(11, i, "evolver/1", 0, tv.numel, 0.5), mutant, tv.tau[i])
    pop = tv.tau.clone()
    pop[i] = cand
    want = tv.state_dict(pop.sum(0) / 3)
    start = tv.state_dict(tv.tau.sum(0) / 3)
    for name in SHAPES:
        assert torch.allclose(seen[0][name], start[name], atol=1e-6)
        assert torch.allclose(seen[1][name], want[name], atol=1e-6)
    assert len(seen) == 4  # the start + one generation of T candidates


def test_builtin_es_maximises_a_quadratic():
    target = torch.tensor([0.3, 1.7, 1.1, 0.9], dtype=F64)
    f = lambda x: -float(((torch.tensor(x, dtype=F64) - target) ** 2).sum())  # noqa: E731
    x0 = [1.0] * 4
    es = OnePlusLambdaES(x0, [0.0] * 4, [2.0] * 4, sigma=0.1, popsize=6, seed=0, start_score=f(x0))
    for _ in range(60):
        xs = es.ask()
        es.tell(xs, [f(x) for x in xs])
    assert es.score > -1e-3 and es.score > f(x0)


def test_argument_errors():
    base, experts = _family(7)
    ev = lambda sd: 0.0  # noqa: E731
    with pytest.raises(ConfigError, match="method must be"):
        search.lambda_search(base, experts, ev, method="slerp")
    with pytest.raises(ConfigError, match="outside its bounds"):
        search.lambda_search(base, experts, ev, init=5.0, optimizer="builtin")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        search.lambda_search(base, experts, ev, optimizer="adam")
    with pytest.raises(ConfigError, match="keep"):
        search.nps(base, experts, ev, keep=0.0)
    with pytest.raises(ConfigError, match="at least two experts"):
        search.evolver(base, experts[:1], ev)
    with pytest.raises(ConfigError, match="evaluate must be a callable"):
        search.evolver(base, experts, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pcb", "ties", "nps", "evolver"])
def test_gpu_tensors_stay_on_gpu_and_match_cpu(name):
    base, experts = _family(8)
    on = lambda sd: {k: v.cuda() for k, v in sd.items()}  # noqa: E731
    runs = {}
    for dev, b, es in (("cpu", base, experts), ("cuda", on(base), [on(e) for e in experts])):
        seen = []

        def ev(sd):
            seen.append({k: v.cpu() for k, v in sd.items()})
            assert all(v.device.type == dev for v in sd.values())
            return -float(sum((v.float() - b[k].float()).pow(2).sum() for k, v in sd.items() if k in SHAPES))

        if name == "evolver":
            search.evolver(b, es, ev, generations=2, seed=1)
        elif name == "nps":
            search.nps(b, es, ev, budget=9, popsize=4, optimizer="builtin", seed=1)
        else:
            search.lambda_search(b, es, ev, method=name, budget=9, popsize=4, optimizer="builtin", seed=1)
        runs[dev] = seen
    assert len(runs["cpu"]) == len(runs["cuda"])
    for a, b in zip(runs["cpu"], runs["cuda"]):
        for k in SHAPES:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
