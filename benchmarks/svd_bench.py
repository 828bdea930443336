"""Randomized SVD benchmark: pymerge's streamed randomized_svd vs torch.svd_lowrank vs torch.linalg.svd.

    python -m benchmarks.svd_bench                      # 1024^2 and 4096^2, ranks 16/64/256, CPU
    python -m benchmarks.svd_bench --sizes 2048 --ranks 64 --device cuda

Equal accuracy: both randomized methods get the same sketch width (rank + 10) and the same number of power
iterations (2), so they run the same algorithm; the table prints each one's accuracy next to its time so the
comparison is at equal (measured) accuracy. The matrix is A = U diag(s) V^T with Haar-random U, V and the slowly
decaying spectrum s_i = 1 / sqrt(i), fp32. Reported per row: best-of-``--repeat`` seconds; ``sv_err`` = max_i
|S_i - s_i| / s_i over the top rank values; ``fro_ratio`` = ||A - U S Vh||_F / ||A - A_rank||_F (1 is optimal).
torch.linalg.svd (full, fp32) is timed once per size and truncated to each rank.
"""

from __future__ import annotations

import argparse
import time

import torch

from pymerge.ops.randomized_svd import randomized_svd

OVERSAMPLE, POWER_ITERS = 10, 2


def known_matrix(n: int, device: str, seed: int = 0):
    """(A fp32 [n, n], spectrum fp64) with Haar-random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float64).sqrt()
    return ((u * s.float()) @ v.T).to(device), s


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def accuracy(a: torch.Tensor, spectrum: torch.Tensor, u, s, vh, rank: int) -> tuple[float, float]:
    s64 = s[:rank].double().cpu()
    sv_err = float(((s64 - spectrum[:rank]).abs() / spectrum[:rank]).max())
    resid = a.double() - (u[:, :rank].double() * s[:rank].double()) @ vh[:rank].double()
    optimal = float(spectrum[rank:].pow(2).sum().sqrt())
    return sv_err, float(torch.linalg.norm(resid).cpu()) / optimal


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-full", action="store_true", help="skip torch.linalg.svd")
    args = ap.parse_args(argv)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"oversample {OVERSAMPLE}, power_iters {POWER_ITERS}")
    print(f"{'size':>6} {'rank':>5} {'method':<18} {'seconds':>9} {'vs ours':>8} {'sv_err':>9} {'fro_ratio':>9}")
    for n in args.sizes:
        a, spectrum = known_matrix(n, args.device)
        full = None
        if not args.no_full:
            full_t, full = timed(lambda: torch.linalg.svd(a, full_matrices=False), args.device, 1)
        for rank in args.ranks:
            ours_t, ours = timed(lambda: randomized_svd(a, rank, oversample=OVERSAMPLE, power_iters=POWER_ITERS),
                                 args.device, args.repeat)
            low_t, low = timed(lambda: torch.svd_lowrank(a, q=rank + OVERSAMPLE, niter=POWER_ITERS),
                               args.device, args.repeat)
            u, s, v = low
            rows = [("pymerge randomized", ours_t, ours), ("torch.svd_lowrank", low_t, (u, s, v.T))]
            if full is not None:
                rows.append(("torch.linalg.svd", full_t, full))
            for label, secs, (uu, ss, vv) in rows:
                err, fro = accuracy(a, spectrum, uu, ss, vv, rank)
                print(f"{n:>6} {rank:>5} {label:<18} {secs:>9.3f} {secs / ours_t:>7.2f}x {err:>9.2e} {fro:>9.4f}")


if __name__ == "__main__":
    main()
