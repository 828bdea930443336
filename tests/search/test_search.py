"""End-to-end searches on the tiny multi-task setup (conftest.py): the search improves the evaluator over its
starting point, the searched merge beats plain averaging on held-out data, runs are deterministic for a seed,
and an evaluator failure is reported with the candidate and can be resumed without losing the search."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge import search
from pymerge.errors import ConfigError

BUDGET = 41  # the start + 5 generations of 8 (lambda) / the start + 3 generations of 13 (nps) evaluations


def _run(name, tasks, evaluate, budget=BUDGET, **kw):
    """One search; ``budget`` in evaluations (evolver: generations of 3 after the start)."""
    if name == "evolver":
        return search.evolver(tasks.base, tasks.experts, evaluate, generations=(budget - 1) // 3, **kw)
    if name == "nps":
        return search.nps(tasks.base, tasks.experts, evaluate, budget=budget, keep=0.3, optimizer="builtin", **kw)
    return search.lambda_search(tasks.base, tasks.experts, evaluate, method=name, budget=budget, popsize=8,
                                optimizer="builtin", **kw)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "pcb", "nps", "evolver"])
def test_search_improves_its_starting_point(tasks, name):
    result = _run(name, tasks, tasks.evaluator("dev"), seed=0)
    assert result.complete and result.history[0].generation == 0
    assert result.start_score == result.history[0].score
    assert result.score == max(t.score for t in result.history)
    assert result.score > result.start_score + 0.01, (result.start_score, result.score)
    # the returned state dict is the best candidate's merge: evaluating it gives the best score again
    assert tasks.accuracy(result.state_dict, "dev") == pytest.approx(result.score, abs=1e-12)
    assert set(result.state_dict) == set(tasks.base)
    assert all(result.state_dict[k].dtype == tasks.base[k].dtype for k in tasks.base)


@pytest.mark.parametrize("name", ["task_arithmetic", "nps", "evolver"])
def test_searched_merge_beats_averaging_on_held_out_data(tasks, name):
    average = tasks.accuracy(tasks.average(), "test")
    result = _run(name, tasks, tasks.evaluator("dev"), seed=0)
    held_out = tasks.accuracy(result.state_dict, "test")
    assert held_out > average + 0.01, (average, held_out)


@pytest.mark.parametrize("name", ["pcb", "nps", "evolver"])
def test_deterministic_for_a_seed(tasks, name):
    ev = tasks.evaluator("dev")
    a, b = _run(name, tasks, ev, budget=17, seed=3), _run(name, tasks, ev, budget=17, seed=3)
    assert a.history == b.history and a.params == b.params
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    c = _run(name, tasks, ev, budget=17, seed=4)
    assert [t.x for t in c.history] != [t.x for t in a.history]


class _FailOn:
    """An evaluator that raises on its n-th call (1-based) and counts its calls."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, sd):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("out of GPU memory (simulated)")
        return self.inner(sd)


@pytest.mark.parametrize("name,fail_at", [("ties", 14), ("evolver", 5), ("nps", 1)])
def test_evaluator_exception_names_the_candidate_and_resumes(tasks, name, fail_at):
    ev = tasks.evaluator("dev")
    full = _run(name, tasks, ev, budget=25, seed=1)
    failing = _FailOn(ev, fail_at)
    with pytest.raises(search.SearchError) as info:
        _run(name, tasks, failing, budget=25, seed=1)
    err = info.value
    failed = full.history[fail_at - 1]  # the uninterrupted run's trial at that position
    assert err.candidate["generation"] == failed.generation and err.candidate["index"] == failed.index
    assert err.candidate["params"] == failed.params
    msg = str(err)
    assert f"candidate {failed.index} of generation {failed.generation}" in msg
    assert "RuntimeError" in msg and "simulated" in msg
    assert isinstance(err.__cause__, RuntimeError)
    partial = err.result
    assert not partial.complete and partial.history == full.history[:fail_at - 1]
    if fail_at > 1:
        best = max(partial.history, key=lambda t: t.score)
        assert partial.score == best.score
        assert tasks.accuracy(partial.state_dict, "dev") == pytest.approx(best.score, abs=1e-12)
    # resume: recorded scores are replayed, the evaluator runs again from the failed candidate only
    counting = _FailOn(ev, -1)
    resumed = _run(name, tasks, counting, budget=25, seed=1, resume=partial)
    assert counting.calls == len(full.history) - (fail_at - 1)
    assert resumed.history == full.history and resumed.score == full.score
    for k in full.state_dict:
        assert torch.equal(resumed.state_dict[k], full.state_dict[k])


def test_resume_from_another_search_is_refused(tasks):
    ev = tasks.evaluator("dev")
    with pytest.raises(search.SearchError) as info:
        _run("pcb", tasks, _FailOn(ev, 12), budget=17, seed=1)
    with pytest.raises(ConfigError, match="resume history does not match"):
        _run("pcb", tasks, ev, budget=17, seed=2, resume=info.value.result)
    with pytest.raises(ConfigError, match="cannot resume from a lambda_search search"):
        _run("evolver", tasks, ev, budget=17, seed=1, resume=info.value.result)


def test_nan_scores_count_as_worst(tasks):
    calls = []

    def ev(sd):
        calls.append(1)
        return float("nan") if len(calls) % 2 == 0 else tasks.accuracy(sd, "dev")

    result = _run("task_arithmetic", tasks, ev, budget=17, seed=0)
    assert all(t.score == -math.inf for t in result.history[1::2])
    assert math.isfinite(result.score)


def test_cma_optimizer_when_installed(tasks):
    pytest.importorskip("cma")
    ev = tasks.evaluator("dev")
    a = search.lambda_search(tasks.base, tasks.experts, ev, method="task_arithmetic", budget=BUDGET, popsize=8,
                             optimizer="cma", seed=5)
    assert a.optimizer == "cma" and a.score > a.start_score
    b = search.lambda_search(tasks.base, tasks.experts, ev, method="task_arithmetic", budget=BUDGET, popsize=8,
                             optimizer="cma", seed=5)
    assert a.history == b.history
