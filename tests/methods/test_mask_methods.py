"""consensus / tall_masks / emr / mmer as merge methods, against float64 oracles of the reference code.

The oracles restate, in float64 over the whole flattened model, what the reference code does:
  * nik-dim/tall_masks: ``topk_values_mask`` (k >= 1 is a percentage; keeps |x| >= kthvalue(D - int(D*K)), ties
    included), ``ties_merging(..., reset_thresh=20, "dis-sum")`` (sign of the sum, zeros take the majority sign of
    the whole model, then sum of the entries with the elected sign), ``generate_task_masks``
    (|theta_0 - theta_t| > |theta_0 + tau_MTL - theta_t| * lambda), ``construct_consensus_mask`` (count >= k);
  * harveyhuang18/EMR_Merging ``emr_merge`` (flag = +1 iff the mean task vector > 0, masks tau_t*flag > 0, max
    agreeing magnitude; rescalers = sum of per-tensor mean|tau_t| / sum of per-tensor mean|M_t tau_uni|);
  * MMER (paper only, docs/methods/masks.md): tau_* = EMR's tau_uni, m_t = |tau_t| > alpha |tau_* - tau_t|.

Test data sits on a 2**-16 grid with |values| bounded so that every task vector, sum and merged weight is exact
in fp32: the fp32 implementation and the float64 oracle then see identical numbers, and every element must be
equal, except where a non-dyadic factor (alpha, lambda, a rescaler) rounds; there the tolerance is a few fp32
ulps, and a mask decision within 1e-6 of its threshold refuses the data (``OracleDomainError``: change the seed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors

F64 = torch.float64
GRID = 2.0**-16

# odd sizes everywhere: 1-element vectors, 3-D lm_head, rows that do not fill a byte of mask bits
SHAPES = {
    "model.embed_tokens.weight": (11, 7),
    "model.layers.0.self_attn.q_proj.weight": (13, 7),
    "model.layers.0.mlp.up_proj.weight": (9, 13),
    "model.layers.0.input_layernorm.weight": (7,),
    "model.layers.0.post_attention_layernorm.weight": (1,),
    "model.layers.1.self_attn.q_proj.weight": (13, 7),
    "model.layers.1.mlp.up_proj.weight": (9, 13),
    "model.layers.1.input_layernorm.weight": (7,),
    "model.layers.1.post_attention_layernorm.weight": (1,),
    "model.norm.weight": (7,),
    "lm_head.weight": (3, 5, 7),
}


class OracleDomainError(AssertionError):
    """A mask decision of the data is too close to its threshold for a float64 oracle to speak for fp32."""


# ------------------------------------------------------------------------------------------------------ data


def make_models(seed: int, n_tasks: int, *, coarse: bool = False, shapes=SHAPES):
    """(base, [expert...]) state dicts of fp32 tensors on a 2**-16 grid (exact task vectors and sums).

    ``coarse``: task vectors in {-3..3} * 2**-3, so magnitudes tie, sums cancel to exactly 0, and TALL comparisons
    hit exact equality (the strict '>' matters).
    """
    g = torch.Generator().manual_seed(seed)
    base, experts = {}, [{} for _ in range(n_tasks)]
    for name, shape in shapes.items():
        b = (torch.randn(shape, generator=g, dtype=F64).clamp(-4, 4) / GRID).round() * GRID
        base[name] = b.float()
        for e in experts:
            if coarse:
                tau = torch.randint(-3, 4, shape, generator=g).to(F64) * 0.125
            else:
                tau = (torch.randn(shape, generator=g, dtype=F64).clamp(-2, 2) * 0.5 / GRID).round() * GRID
            e[name] = (b + tau).float()
    return base, experts


def write_model(path: Path, state: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def write_family(root: Path, base: dict, experts: list[dict]) -> tuple[Path, list[Path]]:
    return write_model(root / "base", base), [write_model(root / f"task{i}", e) for i, e in enumerate(experts)]


def config(method: str, base: Path, experts: list[Path], params: dict | None = None,
           per_model: list[dict] | None = None) -> dict:
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(p), **({"parameters": per_model[i]} if per_model else {})}
                      for i, p in enumerate(experts)]}
    if params:
        cfg["parameters"] = params
    return cfg


# --------------------------------------------------------------------------------------------------- oracles


def flatten(state: dict) -> torch.Tensor:
    """The whole model as one float64 vector (the references' state_dict_to_vector), in dict order."""
    return torch.cat([state[n].to(F64).reshape(-1) for n in state])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, at = {}, 0
    for n in like:
        k = like[n].numel()
        out[n] = vec[at:at + k].reshape(like[n].shape)
        at += k
    return out


def o_topk_values_mask(M: torch.Tensor, K: float) -> torch.Tensor:
    """tall_masks' topk_values_mask on [T, D] float64 (rows trimmed independently, ties with the kth kept)."""
    if K == 100:
        return M
    if K >= 1:
        K = K / 100
    d = M.shape[1]
    kth = d - int(d * K)
    kth_values = M.abs().kthvalue(kth, dim=1, keepdim=True).values
    return M * (M.abs() >= kth_values)


def o_ties_dis_sum(tv: torch.Tensor, K: float) -> torch.Tensor:
    upd = o_topk_values_mask(tv.clone(), K)
    sign = torch.sign(upd.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, upd > 0, upd < 0)
    return (upd * keep).sum(dim=0)


def o_multitask(tv: torch.Tensor, k: float | None, use_ties: bool) -> torch.Tensor:
    if use_ties:
        return o_ties_dis_sum(tv, 20 if k is None else k)
    return o_topk_values_mask(tv.clone(), 100 if k is None else k).sum(dim=0)


def _strict_greater(a: torch.Tensor, lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a > lam * b as the references compute it: an fp32 tensor times a Python float is the fp32 product
    fl32(fl32(lam) * b). Where a or b is not an fp32 number (data off the grid), an fp32 implementation sees
    rounded values, so a decision within 1e-6 of its threshold refuses the data."""
    prod = (lam.float() * b.float()).double()
    off_grid = (a.float().double() != a) | (b.float().double() != b)
    close = off_grid & ((a - prod).abs() <= 1e-6 * prod.abs())
    if bool(close.any()):
        raise OracleDomainError(f"{int(close.sum())} mask decisions within 1e-6 of their threshold")
    return a > prod


def o_tall_masks(ptm: torch.Tensor, ft: torch.Tensor, tv: torch.Tensor, lambdas) -> torch.Tensor:
    lam = torch.tensor(lambdas, dtype=F64).reshape(-1, 1)
    return _strict_greater((ptm - ft).abs(), lam.expand_as(ft), (ptm + tv - ft).abs())


def o_emr(tvs: torch.Tensor, sizes: list[int]):
    """(tau_uni, masks [T, D], rescalers [T]) of emr_merge; per-tensor means over the segments ``sizes``."""
    flag = (tvs.mean(dim=0) > 0).to(F64) * 2 - 1
    masks = (tvs * flag) > 0
    uni = torch.zeros_like(flag)
    for t in range(tvs.shape[0]):
        a = (masks[t] * tvs[t]).abs()
        uni = torch.where(a > uni, a, uni)
    uni = uni * flag
    scales = torch.zeros(tvs.shape[0], dtype=F64)
    new = torch.zeros(tvs.shape[0], dtype=F64)
    for seg_tv, seg_uni, seg_m in zip(tvs.split(sizes, dim=1), uni.split(sizes), masks.split(sizes, dim=1)):
        scales += seg_tv.abs().mean(dim=1)
        new += (seg_uni * seg_m).abs().mean(dim=1)
    return uni, masks, scales / new


class Oracle:
    """Float64 reference results for one family and one method configuration, over the flattened model."""

    def __init__(self, base: dict, experts: list[dict], method: str, params: dict | None = None,
                 lambdas: list[float] | None = None):
        params = dict(params or {})
        self.names = list(base)
        self.like = base
        self.ptm = flatten(base)
        self.ft = torch.stack([flatten(e) for e in experts])
        self.tv = self.ft - self.ptm
        T = len(experts)
        self.rescalers = [1.0] * T
        if method in ("tall_masks", "consensus"):
            self.shared = o_multitask(self.tv, params.get("k"), bool(params.get("use_ties", False)))
            lam = lambdas if lambdas is not None else [0.6] * T
            self.masks = o_tall_masks(self.ptm, self.ft, self.shared, lam)
            if method == "consensus":
                cons = self.masks.sum(dim=0) >= params.get("prun_thre_k", 2)
                self.merged = self.ptm + params.get("scaling_coef", 1.0) * (self.shared * cons)
            else:
                self.merged = self.ptm + self.shared
        else:
            sizes = [base[n].numel() for n in self.names]
            uni, masks, resc = o_emr(self.tv, sizes)
            self.shared, self.merged = uni, self.ptm + uni
            if method == "emr":
                self.masks, self.rescalers = masks, [float(r) for r in resc]
            else:  # mmer
                alpha = params.get("alpha", 1.0)
                self.masks = _strict_greater(self.tv.abs(), torch.full_like(self.tv, alpha), (uni - self.tv).abs())
                self.rescalers = [params.get("lambda", 1.0)] * T

    def merged_state(self) -> dict:
        return unflatten(self.merged, self.like)

    def mask_state(self, t: int) -> dict:
        return unflatten(self.masks[t], self.like)

    def task_state(self, t: int) -> dict:
        """theta_0 + r_t * (tau * m_t), the references' per-task model."""
        return unflatten(self.ptm + (self.shared * self.masks[t]) * self.rescalers[t], self.like)


def assert_state_close(ours: dict, ref: dict, *, exact: bool, what: str) -> None:
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for n in ref:
        got, want = ours[n].to(F64), ref[n]
        assert tuple(got.shape) == tuple(want.shape), (n, got.shape, want.shape)
        if exact:
            bad = got != want
            assert not bool(bad.any()), (f"{what}: tensor {n}: {int(bad.sum())} of {bad.numel()} elements differ, "
                                         f"first {float(got[bad][0])!r} vs {float(want[bad][0])!r}")
        else:
            # a few fp32 roundings of a product of terms bounded by |theta| + |tau| <= 16
            torch.testing.assert_close(got, want, rtol=4e-7, atol=16 * 2**-23, msg=lambda m: f"{what}: {n}: {m}")


def merged_output(out_dir: Path) -> dict:
    return load_file(str(out_dir / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------- tests

# (method, params, per-task lambdas, exact) ; lambdas are per_model tall_mask_lambda
CASES = {
    "consensus_ta": ("consensus", {"scaling_coef": 0.5}, [0.5, 0.25, 0.375, 0.5], True),
    "consensus_ta_k": ("consensus", {"k": 30, "prun_thre_k": 1, "scaling_coef": 0.7}, [0.6, 0.4, 0.2, 0.3], False),
    "consensus_ties": ("consensus", {"use_ties": True, "prun_thre_k": 2}, [0.5, 0.5, 0.25, 0.75], True),
    "consensus_ties_k": ("consensus", {"use_ties": True, "k": 0.45, "prun_thre_k": 3}, [0.6, 0.6, 0.5, 0.5], True),
    "tall_masks_ta": ("tall_masks", {}, None, True),
    "tall_masks_ta_k": ("tall_masks", {"k": 15}, None, True),
    "tall_masks_ties": ("tall_masks", {"use_ties": True}, None, True),
    "emr": ("emr", {}, None, True),
    "mmer": ("mmer", {"alpha": 0.6, "lambda": 0.8}, None, True),
}


@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "ties"])
@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_matches_oracle(tmp_path, case, coarse):
    method, params, lambdas, exact = CASES[case]
    base, experts = make_models(11 + len(case), 4, coarse=coarse)
    bdir, edirs = write_family(tmp_path, base, experts)
    per_model = [{"tall_mask_lambda": lam} for lam in lambdas] if lambdas else None
    pymerge.merge(config(method, bdir, edirs, params, per_model), tmp_path / "out", quiet=True)
    ref = Oracle(base, experts, method, params, lambdas)
    assert_state_close(merged_output(tmp_path / "out"), ref.merged_state(), exact=exact, what=case)


def test_consensus_prun_thre_k_limits():
    """prun_thre_k = 0 is plain TA (every element kept); k > T keeps nothing (the base)."""
    base, experts = make_models(3, 3, shapes={"w": (5, 9)})
    inputs = [base["w"], *[e["w"] for e in experts]]
    mp = [{}] + [{}] * 3
    ta = merge_tensors("consensus", inputs, base_index=0, params={"prun_thre_k": 0}, model_params=mp)
    want = base["w"].double() + sum(e["w"].double() - base["w"].double() for e in experts)
    assert torch.equal(ta.double(), want)
    none = merge_tensors("consensus", inputs, base_index=0, params={"prun_thre_k": 4}, model_params=mp)
    assert torch.equal(none, base["w"])


def test_ties_zero_election_takes_the_model_majority_sign():
    """Where the trimmed task vectors cancel exactly, the reference elects the majority sign of the whole model
    and sums the entries with that sign: +a and -a give +a when most elected signs are +, -a otherwise."""
    n = 40
    base = torch.zeros(1, n)
    for majority in (1.0, -1.0):
        a = torch.full((1, n), 0.5 * majority)  # every other element elects `majority`
        b = a.clone()
        b[0, :3] = -a[0, :3]  # elements 0..2 cancel: a + b = 0
        a[0, 3:] = a[0, 3:] * 0.5
        out = merge_tensors("tall_masks", [base, base + a, base + b], base_index=0, params={"use_ties": True, "k": 100},
                            model_params=[{}, {}, {}])
        # the cancelling elements keep the entry whose sign is the majority: 0.5 * majority
        assert torch.equal(out[0, :3], torch.full((3,), 0.5 * majority)), (majority, out[0, :3])
        assert torch.equal(out[0, 3:], (a + b)[0, 3:])


def test_emr_zero_mean_elects_minus():
    """EMR's flag is (mean > 0) * 2 - 1: a zero mean elects -1, so only the negative task vector survives."""
    base = torch.zeros(3)
    a, b = torch.tensor([0.25, 0.5, 0.0]), torch.tensor([-0.25, -0.5, 0.0])
    out = merge_tensors("emr", [base, a, b], base_index=0, model_params=[{}, {}, {}])
    assert torch.equal(out, torch.tensor([-0.25, -0.5, 0.0]))


SINGLE = {
    "consensus": ({"scaling_coef": 0.3}, {"tall_mask_lambda": 0.4}),
    "consensus_ties": ({"use_ties": True, "k": 33}, {"tall_mask_lambda": 0.5}),
    "tall_masks_k": ({"k": 0.4}, {}),
    "emr": ({}, {}),
    "mmer": ({"alpha": 0.7}, {}),
}


# 1-D tensors are one row whatever the chunking, so only matrices are listed; 3 experts and two chunkings keep
# the model-wide selections (65,536-bin histograms per chunk on the torch backend) cheap
@pytest.mark.parametrize("shape", [(19, 17), (3, 5, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("setup", list(SINGLE))
def test_bit_identical_for_any_chunking(setup, shape):
    method = setup.split("_ties")[0].split("_k")[0]
    params, mp = SINGLE[setup]
    base, experts = make_models(7, 3, coarse=True, shapes={"w": shape})
    inputs = [base["w"], *[e["w"] for e in experts]]
    whole = merge_tensors(method, inputs, base_index=0, params=params, model_params=[{}] + [dict(mp)] * 3)
    for rows in (1, 7):
        got = merge_tensors(method, inputs, base_index=0, params=params, model_params=[{}] + [dict(mp)] * 3,
                            max_rows_per_chunk=rows)
        assert torch.equal(got, whole), (setup, rows)


@pytest.mark.parametrize("method,params", [("consensus", {"use_ties": True}), ("consensus", {"k": 20}),
                                           ("tall_masks", {}), ("emr", {}), ("mmer", {})])
def test_file_merge_is_identical_with_a_tiny_memory_budget(tmp_path, method, params):
    base, experts = make_models(5, 3, shapes={"model.embed_tokens.weight": (29, 61), "model.norm.weight": (61,)})
    bdir, edirs = write_family(tmp_path, base, experts)
    cfg = config(method, bdir, edirs, params)
    whole = pymerge.merge(cfg, tmp_path / "whole", quiet=True)
    small = pymerge.merge(cfg, tmp_path / "small", quiet=True, max_memory=12 * 1024)
    assert whole.chunked_tensors == 0 and small.chunked_tensors >= 1
    assert (tmp_path / "whole/model.safetensors").read_bytes() == (tmp_path / "small/model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["consensus", "tall_masks", "emr", "mmer"])
def test_tiny_family_end_to_end(tmp_path, tiny_family, method):
    params = {"consensus": {"use_ties": True, "scaling_coef": 0.4}, "mmer": {"alpha": 0.8}}.get(method, {})
    cfg = config(method, tiny_family.base, tiny_family.experts, params)
    pymerge.merge(cfg, tmp_path / "out", quiet=True)
    from pymerge.io.checkpoint import Checkpoint

    with Checkpoint.open(tiny_family.base) as b:
        base = {n: b.tensor(n).clone() for n in b.names()}
    experts = []
    for e in tiny_family.experts:
        with Checkpoint.open(e) as ck:
            experts.append({n: ck.tensor(n).clone() for n in base})
    ref = Oracle(base, experts, method, params)
    # the synthetic family is not on a grid: fp32 task vectors and sums round, so compare within fp32 ulps
    assert_state_close(merged_output(tmp_path / "out"), ref.merged_state(), exact=False, what=method)


@pytest.mark.parametrize("method,params,message", [
    ("tall_masks", {"k": 150}, "between 0 and 100"),
    ("consensus", {"prun_thre_k": -1}, "prun_thre_k"),
    ("mmer", {"alpha": -0.5}, ">= 0"),
    ("tall_masks", {"density": 0.5}, "unknown parameter"),
])
def test_bad_parameters_are_config_errors(tmp_path, method, params, message):
    base, experts = make_models(1, 2, shapes={"model.norm.weight": (5,)})
    bdir, edirs = write_family(tmp_path, base, experts)
    with pytest.raises(ConfigError, match=message):
        pymerge.merge(config(method, bdir, edirs, params), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_negative_tall_mask_lambda_is_a_config_error(tmp_path):
    base, experts = make_models(1, 2, shapes={"model.norm.weight": (5,)})
    bdir, edirs = write_family(tmp_path, base, experts)
    with pytest.raises(ConfigError, match="mask thresholds must be >= 0"):
        pymerge.merge(config("consensus", bdir, edirs, None, [{"tall_mask_lambda": -1}, {}]), tmp_path / "o",
                      quiet=True)
