"""Compute the statistics files data-informed merges read, for a torch ``nn.Module`` on the user's batches.

    fisher_diagonals(model, batches)  F[p] = (1/N) sum_batches (dL_b/dp)^2      (Fisher merging)
    gram_matrices(model, batches)     G[W] = X^T X / #rows(X) for the input X of every nn.Linear  (RegMean)
    save_statistics(stats, path)      one safetensors file keyed by the model's parameter names

Both follow MergeLM (``fisher_merging`` / ``regmean_merging``): for classification logits the batch objective
is L_b = sum_examples sum_y sqrt(p^_y) log p_y with p^ = softmax(logits) detached (the expected Fisher), or a
user ``loss_fn`` (e.g. the MSE for regression); N counts examples. As in the reference the gradient of the
*batch-summed* objective is squared, which is not the per-example Fisher; ``per_example=True`` squares each
example's gradient instead (one backward per example, slower). Grams average over every row the layer sees
(tokens, for a sequence model), accumulated in float64.

Names: a parameter's ``named_parameters()`` name, with ``prefix`` prepended so they match the checkpoint's
tensor names (e.g. a Hugging Face model saved as a whole has the same names; a sub-module needs its prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], torch.Tensor]


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    """model(batch) for a tensor, model(*batch) for a tuple/list, model(**batch) for a dict; ``.logits`` when
    the output has them (Hugging Face models)."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    return getattr(out, "logits", out)


def _expected_fisher_objective(logits: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in at least fp32
    logp = torch.log_softmax(logits, dim=-1)
    return (logp.detach().exp().sqrt() * logp).sum()


def fisher_diagonals(model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                     per_example: bool = False, names: Sequence[str] | None = None,
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every trainable parameter (or of ``names``): mean over examples of squared gradients.

    Default objective per batch: the expected-Fisher classification objective on ``forward(model, batch)``
    logits [examples, classes]; ``loss_fn(model, batch) -> scalar`` replaces it (N then counts batches unless
    ``forward`` gives the example count: the first dim of its output). ``per_example`` needs the default
    objective (the batch is split along the logits' first dim by re-running the forward per example).
    """
    forward = forward or _default_forward
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    if names is not None and set(names) - set(params):
        raise KeyError(f"no trainable parameters named {sorted(set(names) - set(params))}")
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if loss_fn is not None:
                objectives, n_examples = [loss_fn(model, batch)], 1
            elif per_example:
                logits = forward(model, batch)
                n_examples = logits.shape[0]
                objectives = [_expected_fisher_objective(logits[i:i + 1]) for i in range(n_examples)]
            else:
                logits = forward(model, batch)
                objectives, n_examples = [_expected_fisher_objective(logits)], logits.shape[0]
            for k, obj in enumerate(objectives):
                grads = torch.autograd.grad(obj, list(params.values()), retain_graph=k + 1 < len(objectives),
                                            allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        sums[n] += g.detach().to(torch.float64) ** 2
            count += n_examples
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_diagonals: no batches")
    return {prefix + n: (s / count).to(torch.float32) for n, s in sums.items()}


def gram_matrices(model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None,
                  modules: Sequence[str] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """G = X^T X / rows for the input X of every ``nn.Linear`` (or those named in ``modules``), keyed by the
    layer's weight name ``<module>.weight``; forward hooks, no gradients."""
    forward = forward or _default_forward
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (modules is None or n in modules)}
    if modules is not None and set(modules) - set(linears):
        raise KeyError(f"no nn.Linear modules named {sorted(set(modules) - set(linears))}")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {f"{prefix}{n}.weight": (sums[n] / rows[n]).to(torch.float32) for n in linears if n in sums}


def save_statistics(stats: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write statistics as one safetensors file (fp32, contiguous, on CPU) for ``fisher:`` / ``gram:``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in stats.items()}, str(path),
              metadata={"format": "pt", "producer": "pymerge.statistics_helper"})
    return path
