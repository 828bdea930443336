"""A tiny multi-task setup trained in about a second: one base MLP, one fine-tuned copy per synthetic
binary-classification task, and dev / held-out test splits.

Task t lives in its own region of input space (a shifted Gaussian) and labels it by a random hyperplane;
the shared head has two logits per task and a task is scored on its own two (task-aware evaluation, as in
the merging literature with per-task heads). Each expert knows its task only, so a good merge must keep
every task vector at a useful scale: plain averaging divides each by T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pymerge.ops.threads import threads_for

D_IN, HIDDEN, TASKS = 16, 32, 3


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2 * TASKS))


@dataclass
class Tasks:
    base: dict
    experts: list
    splits: dict
    net: nn.Module

    def accuracy(self, sd: dict, split: str) -> float:
        """Mean over tasks of the accuracy of ``sd`` on ``split`` (each task on its own two logits)."""
        with torch.no_grad():
            accs = []
            for t, (x, y) in enumerate(self.splits[split]):
                out = functional_call(self.net, sd, (x,))[:, 2 * t:2 * t + 2]
                accs.append((out.argmax(1) == y).double().mean().item())
        return sum(accs) / len(accs)

    def evaluator(self, split: str = "dev") -> Callable[[dict], float]:
        return lambda sd: self.accuracy(sd, split)

    def average(self) -> dict:
        return {k: sum(e[k] for e in self.experts) / len(self.experts) for k in self.base}


@pytest.fixture(scope="session")
def tasks() -> Tasks:
    with threads_for(0):  # tiny matrices: one thread is several times faster on a loaded 2-core machine
        return _make_tasks()


def _make_tasks() -> Tasks:
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(D_IN, generator=g) for _ in range(TASKS)]
    shifts = [torch.randn(D_IN, generator=g) for _ in range(TASKS)]

    def data(t: int, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, D_IN, generator=gen) + shifts[t]
        return x, (x @ dirs[t] > shifts[t] @ dirs[t]).long()

    splits = {name: [data(t, n, 100 * i + t) for t in range(TASKS)]
              for i, (name, n) in enumerate([("train", 512), ("dev", 256), ("test", 2000)])}
    torch.manual_seed(0)
    base = make_model()
    # a short "pre-training" on random labels, so the base is a trained network rather than a fresh init
    xs, ys = torch.randn(1024, D_IN, generator=g), torch.randint(0, 2 * TASKS, (1024,), generator=g)
    _train(base, lambda m: nn.functional.cross_entropy(m(xs), ys), 50)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    experts = []
    for t in range(TASKS):
        m = make_model()
        m.load_state_dict(base_sd)
        x, y = splits["train"][t]
        _train(m, lambda m, x=x, y=y, t=t: nn.functional.cross_entropy(m(x)[:, 2 * t:2 * t + 2], y), 150)
        experts.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return Tasks(base_sd, experts, splits, make_model())


def _train(model: nn.Module, loss_fn, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
