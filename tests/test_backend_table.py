"""The table of backend facts (``atv_sparse.ops.backends``) and the dispatcher that reads it."""

import pytest
import torch

from atv_sparse.errors import AtvSparseError
from atv_sparse.ops import backends, dispatch, runner
from atv_sparse.ops.dispatch import BUCKETS, Plan, heuristic_plan


def test_entries_are_consistent():
    names = [b.name for b in backends.TABLE]
    assert len(names) == len(set(names))
    for entry in backends.TABLE:
        assert entry.over_limit is None or entry.over_limit in backends.FACTS
        assert (entry.token_limit is None) == (entry.over_limit is None), entry.name
        assert entry.layout in (None, "cslt", "dense", "sp24"), entry.name  # the layouts runner.build_layouts builds
    assert backends.BACKENDS[0] == "auto" and "dense" not in backends.BACKENDS
    assert set(backends.LAYOUT_BACKENDS) == {"cuda_sp24", "cusparselt", "dense"}


def test_unknown_backend_is_named():
    with pytest.raises(AtvSparseError, match="unknown backend 'nope'"):
        dispatch.machine_status("nope", torch.device("cpu"))


def test_heuristic_plan_from_the_table():
    """The unmeasured GPU plan: cuda up to 4 tokens, triton up to 64, cusparselt above."""
    plan = heuristic_plan(["cuda", "triton", "cusparselt"], dense_fallback=True)
    expect = ["cuda" if t <= 4 else "triton" if t <= 64 else "cusparselt" for t in BUCKETS]
    assert list(plan.backends) == expect
    assert heuristic_plan(["cuda"], dense_fallback=False) == Plan(
        tuple("cuda" if t <= 4 else "reference" for t in BUCKETS), (-1,) * len(BUCKETS))
    assert heuristic_plan(["cuda", "triton"], dense_fallback=False).pick(8192)[0] == "triton"


def test_default_plan_skips_kernels_not_planned_on_the_device():
    """Triton under the CPU interpreter is usable for tests but never picked by an ``auto`` plan."""
    assert runner.default_plan(torch.device("cpu"), ["triton"]) == Plan.uniform("reference")
    assert runner.default_plan(torch.device("cuda"), ["triton"]).pick(1)[0] == "triton"


def test_token_limit_hands_over():
    assert runner.token_limited("cuda", 17) == "triton"
    assert runner.token_limited("cuda", 16) == "cuda"
    with pytest.raises(AtvSparseError, match="runs up to 16 tokens"):
        runner.token_limited("cuda", 17, fixed="cuda", name="layer.q")
