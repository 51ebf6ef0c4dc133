"""glibc's thresholds around the engine's calls (NOTE [large buffers] in
``pipeline/hessian/allocator.py``): set when the first call starts, glibc's defaults back when
the last one ends, whatever the nesting and the threads; never undone once kept for good; one
span for a whole local run."""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline import hessian
from pipeline.execution.outputs import Work
from pipeline.execution.run import run
from pipeline.hessian import allocator

from .configs import config
from .nets import mlp

RAISED = (allocator.MMAP_THRESHOLD, allocator.TRIM_THRESHOLD)
DEFAULTS = (allocator._GLIBC_DEFAULT, allocator._GLIBC_DEFAULT)


@pytest.fixture
def calls(monkeypatch):
    """The thresholds set, in order (glibc left alone)."""
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(allocator, "mallopt", lambda *a: seen.append(a) or True)
    monkeypatch.setattr(allocator, "_depth", 0)
    monkeypatch.setattr(allocator, "_for_good", False)
    return seen


def _nested(reused):
    with reused(), reused():
        pass


def _two_threads(reused):
    inside, leave = threading.Barrier(2), threading.Event()

    def work():
        with reused():
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    leave.set()
    for t in threads:
        t.join()


def _after_for_good(reused):
    allocator.keep_for_good()
    with reused():
        pass


# (what happens, the thresholds set in order)
SPANS = [
    ("nested calls", _nested, [RAISED, DEFAULTS]),
    ("two threads at once", _two_threads, [RAISED, DEFAULTS]),
    ("kept for good, then a call", _after_for_good, [RAISED]),
]


@pytest.mark.parametrize(("name", "act", "expected"), SPANS, ids=[s[0] for s in SPANS])
def test_the_thresholds_are_set_once_a_span_and_undone_at_its_end(calls, name, act, expected):
    act(allocator.large_buffers_reused)
    assert calls == expected, f"{name}: {calls}"
    assert allocator._depth == 0


def test_a_hessian_call_runs_inside_the_span(calls):
    x = torch.randn(3, 8, dtype=torch.float64)
    model = mlp(8).double()
    h = hessian(model, x, [0])
    ref = torch.stack([torch.autograd.functional.hessian(lambda v: model(v[None])[0, 0], xi)
                       for xi in x])  # fmt: skip
    torch.testing.assert_close(h[:, 0], ref)
    assert calls == [RAISED, DEFAULTS], calls


def test_a_local_runs_blocks_are_computed_in_one_span(calls, tmp_path, monkeypatch):
    """Each block's ``hessian`` call is nested in the run's span: no block undoes the
    thresholds for the next (the run's probes before it have spans of their own)."""
    compute = Work.compute

    def noted(self, *args, **kwargs):
        calls.append(("block", allocator._depth))
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(Work, "compute", noted)
    result = run(config("data=synthetic", "data.n_samples=24", "storage.block_rows=16",
                        f"storage.path={tmp_path / 'h.h5'}"))  # fmt: skip
    blocks = [i for i, c in enumerate(calls) if c[0] == "block"]
    assert result.blocks_computed == len(blocks) > 1
    assert all(calls[i][1] == 1 for i in blocks), calls  # inside the run's span, not nested
    between = calls[blocks[0] : blocks[-1]]
    assert DEFAULTS not in between and calls[-1] == DEFAULTS, calls


def _in_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1),
                                torch.nn.Tanh(), torch.nn.Linear(4, 1))  # fmt: skip
    return model.train()


# (warning, model): hessian()'s warnings, which must name the line that called it
WARNINGS = [
    ("all Hessian entries are zero", lambda: torch.nn.Linear(4, 2)),
    ("model was in training mode", _in_training_mode),
]


@pytest.mark.parametrize(("message", "make"), WARNINGS, ids=[w[0] for w in WARNINGS])
def test_warnings_of_a_wrapped_call_point_at_its_caller(message, make):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessian(make(), torch.randn(2, 4), [0])
    found = [w for w in caught if message in str(w.message)]
    assert found, [str(w.message) for w in caught]
    assert found[0].filename == __file__, f"{message}: points at {found[0].filename}"
