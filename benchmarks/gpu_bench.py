"""GPU benchmark, one command on a machine with a CUDA GPU:  python benchmarks/gpu_bench.py [--n 268435456]

Prints a table: for each fused kernel (CUDA and Triton) the GB/s it moves (bytes read + written) next to a
device-to-device copy's rate counted the same way (the kernel's ceiling); then a whole-tensor merge through the
streaming executor (host bf16 inputs -> output on the host) next to its floor, a pinned read + H2D of the same inputs.
Numbers are measured, never estimated; nothing is written to RESULTS.md automatically.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeat: int = 5) -> float:
    """Best wall time of ``fn`` in seconds, synchronized (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_rows(n: int, k: int):
    from pymerge.ops import native_cpu, native_cuda

    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    xs = torch.stack([(base.float() + torch.randn(n, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
                      for _ in range(k)])
    experts = list(xs)
    weights = [1.0 / k] * k
    small = 1 << 20  # thresholds from a CPU slice are enough for timing: the map's work does not depend on them
    ths = native_cpu.ties_thresholds(base[:small].cpu(), [e[:small].cpu() for e in experts], [0.3] * k)
    keys, cutoffs = [t.key for t in ths], [n] * k
    in_bytes, out_bytes = (k + 1) * n * 2, n * 2
    src = torch.empty(in_bytes + out_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    hist = torch.zeros(k, 1 << 16, dtype=torch.int64, device="cuda")
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dare_kw = dict(seed=1, model_ids=list(range(1, k + 1)), tensor_name="w", probs=[0.3] * k, consensus="sum")
    ops = {
        ("radix_hist_hi", "cuda"): (lambda: native_cuda.radix_hist_hi(experts, base=base, hist=hist), in_bytes),
        ("ties_map", "cuda"): (lambda: native_cuda.ties_map(base, experts, weights, keys, cutoffs, out=out),
                               in_bytes + out_bytes),
        ("dare_map", "cuda"): (lambda: native_cuda.dare_map(base, experts, weights, out=out, **dare_kw),
                               in_bytes + out_bytes),
    }
    try:
        from pymerge.triton_kernels import dare_map as tdm
        from pymerge.triton_kernels import radix_hist as trh
        from pymerge.triton_kernels import ties_map as ttm

        ops[("radix_hist_hi", "triton")] = (lambda: trh.radix_hist_hi(xs, base=base, hist=hist), in_bytes)
        ops[("ties_map", "triton")] = (lambda: ttm.ties_map(base, xs, weights, keys, cutoffs, out=out),
                                       in_bytes + out_bytes)
        ops[("dare_map", "triton")] = (lambda: tdm.dare_map(base, xs, weights, out=out, **dare_kw),
                                       in_bytes + out_bytes)
    except ImportError as exc:
        print(f"(Triton kernels skipped: {exc})")
    rows = []
    for (name, backend), (fn, nbytes) in ops.items():
        s = timed(fn)
        # the copy reads and writes every byte: its rate counts both, as the kernels' rates do
        rows.append((name, backend, nbytes / s / 1e9, 2 * (in_bytes + out_bytes) / copy_s / 1e9))
    return rows


def merge_rows(rows_: int, cols: int, k: int, budget: int):
    from pymerge.gpu.kernels import get_kernels
    from pymerge.gpu.streaming import StreamingExecutor, merge_tensors_gpu
    from pymerge.methods import TensorJob

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(rows_, cols, generator=g).to(torch.bfloat16) for _ in range(k + 1)]
    nbytes = sum(t.numel() * 2 for t in tensors)
    pinned = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    dev = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")

    def floor():  # read every input once into pinned memory and copy it to the device
        at = 0
        for t in tensors:
            pinned[at:at + t.numel()].copy_(t.reshape(-1))
            at += t.numel()
        dev.copy_(pinned, non_blocking=True)

    floor_s = timed(floor, 3)
    out = []
    for method, mp in (("ties", {"density": 0.3}), ("dare_ties", {"density": 0.3})):
        params = {"normalize": method == "ties", "lambda": 1.0, "rescale": False, "consensus_method": "sum"}
        job = TensorJob(name="w", shape=(rows_, cols), inputs=[f"m{i}" for i in range(k + 1)], base_index=0,
                        params=params, model_params=[{}] + [{"weight": 1.0 / k, **mp} for _ in range(k)],
                        model_ids=list(range(k + 1)), seed=1)
        for backend in ("cuda", "triton"):
            try:
                kernels = get_kernels(backend)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is reported, not fatal
                print(f"({backend} merge skipped: {exc})")
                continue
            engine = StreamingExecutor("cuda", budget)
            s = timed(lambda: merge_tensors_gpu(method, job, tensors, torch.bfloat16, engine, kernels), 3)
            out.append((f"{method} merge ({'chunked' if engine.stats.chunked_tensors else 'resident'})", backend,
                        nbytes / s / 1e9, nbytes / floor_s / 1e9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 28, help="elements per kernel input (default 2^28)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--max-gpu-memory", type=int, default=2 << 30, help="bytes for the streaming merge")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}   torch {torch.__version__}   n={args.n} experts={args.experts}")
    print(f"{'op':34s} {'backend':8s} {'GB/s':>9s} {'ceiling GB/s':>13s} {'% of ceiling':>13s}")
    for name, backend, gbs, ceiling in kernel_rows(args.n, args.experts):
        print(f"{name:34s} {backend:8s} {gbs:9.1f} {ceiling:13.1f} {100 * gbs / ceiling:12.1f}%")
    print("GB/s: bytes the kernel reads + writes; ceiling: a device-to-device copy, bytes read + written")
    for name, backend, gbs, ceiling in merge_rows(args.rows, args.cols, args.experts, args.max_gpu_memory):
        print(f"{name:34s} {backend:8s} {gbs:9.1f} {ceiling:13.1f} {100 * gbs / ceiling:12.1f}%")
    print("merge ceiling: pinned read of the host inputs + H2D copy (input GB/s)")


if __name__ == "__main__":
    main()
