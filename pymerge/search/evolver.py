"""Evolver: differential evolution of the fine-tuned models themselves, scored through a merger.

As ``duguodong7/model-evolution`` ``evolve_with_merger`` (methods.md F2). The population is the T task
vectors; fitness is ``evaluate(merge(population))``. Each generation visits every individual ``i`` in a random
order:
  ref      uniform among the other individuals;
  mutate   x' = (1 - f) x_i + f x_ref                         (f = 0.5)
  cross    each element takes x' with probability cr, else x_i (cr = 0.5)
  select   substitute x' for x_i, re-merge, evaluate; keep it only if the merged score improves (greedy).
The result is the final population's merge, which is also the best by ``evaluate`` (the reference keeps the
best by *test* score; here only the user's evaluator is used). Mergers: ``average`` (the reference's FedAvg:
base + mean_t x_t) and ``task_arithmetic`` (base + ``lambda_`` * sum_t x_t), both updated incrementally.

Randomness: the visiting order and the reference choices come from a torch.Generator seeded with ``seed``;
crossover masks from the counter-based Philox stream keyed (seed, individual, "evolver/<generation>"), so a
candidate is the same on any device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from ..ops.philox import keep_mask
from ..ops.threads import threads_for
from .result import SearchResult
from .session import Evaluate, Session
from .task_vectors import TaskVectors

MERGERS = ("average", "task_arithmetic")


def evolver(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], evaluate: Evaluate,
            *, generations: int = 15, f: float = 0.5, cr: float = 0.5, merger: str = "average",
            lambda_: float = 1.0, seed: int = 0, exclude: Sequence[str] = (),
            resume: SearchResult | None = None) -> SearchResult:
    """Evolve the experts' task vectors for ``generations`` rounds (T candidates each) to maximise
    ``evaluate(merger(population))``; returns the final merge, its score and every trial.

    ``f``: mutation step towards the reference individual; ``cr``: crossover probability per element.
    ``exclude``, ``resume`` as in ``lambda_search``; deterministic for a seed.
    """
    if merger not in MERGERS:
        raise ConfigError(f"evolver: merger must be one of {', '.join(MERGERS)}, got {merger!r}")
    if generations < 0:
        raise ConfigError(f"evolver: generations must be >= 0, got {generations}")
    if not (0 <= f <= 1 and 0 <= cr <= 1):
        raise ConfigError(f"evolver: f and cr must be in [0, 1], got f={f}, cr={cr}")
    tv = TaskVectors(base, experts, exclude)
    if tv.count < 2:
        raise ConfigError("evolver: needs at least two experts (each mutates towards another)")
    session = Session("evolver", evaluate, "differential evolution", resume)
    with threads_for(tv.tau.numel()):  # a small model (and its evaluator) runs faster on one thread
        return _evolve(tv, session, generations, f, cr, merger, lambda_, seed)


def _evolve(tv: TaskVectors, session: Session, generations: int, f: float, cr: float, merger: str,
            lambda_: float, seed: int) -> SearchResult:
    t, d = tv.count, tv.numel
    scale = 1.0 / t if merger == "average" else float(lambda_)
    pop = tv.tau.clone()
    merged = pop.sum(0) * scale  # the merged task vector, updated incrementally on every accepted move
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)

    current = session.score(0, 0, (), {"merger": merger}, lambda: tv.state_dict(merged))
    accepted: list[tuple[int, int, int]] = []
    for g in range(1, generations + 1):
        for pos, i in enumerate(torch.randperm(t, generator=gen).tolist()):
            r = int(torch.randint(t - 1, (), generator=gen))
            ref = r if r < i else r + 1
            mutant = pop[i] * (1 - f) + pop[ref] * f
            take = keep_mask(seed, i, f"evolver/{g}", 0, d, cr, device=tv.device)
            cand = torch.where(take, mutant, pop[i])
            cand_merged = merged + (cand - pop[i]) * scale
            score = session.score(g, pos, (i, ref), {"individual": i, "ref": ref},
                                  lambda cm=cand_merged: tv.state_dict(cm))
            if score > current:
                pop[i] = cand
                merged = cand_merged
                current = score
                accepted.append((g, i, ref))
    final = merged
    return session.result(params={"merger": merger, "generations": generations, "accepted": accepted},
                          build=lambda: tv.state_dict(final), score=current)
