"""Determinism on the CPU with default settings, on both kernel sets of the fused path (compiled and PyTorch).

Two identical runs agree bit for bit, and so do a resumed run and a straight one. The compiled kernels are not
bit-identical to the PyTorch ones (they agree to rounding), so a run must not switch from one set to the other at a
step that depends on how long the compile took: the fused path waits for the compiled kernels at their first use
(``monoflow_core.fused.SETTINGS.wait``). Compared here: the flow's parameters and buffers, the optimizer's
state and the losses and test results the run's callback receives (not ``Trainer.history``, whose length is the
trainer's business). On the compiled path the weight gradients are summed over the parts a batch is split into, one per
thread (``fused.kernel_parts``), so results are reproducible for a given thread count: every run here uses one.
"""

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from monoflow_core import FlowConfig, build_flow, fused
from monoflow_core.fused import COMPILER, KERNEL_SETS, SETTINGS, kernels
from monoflow_core.training import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(params=["compiled", "pytorch"])
def kernel_set(request, monkeypatch):
    """Run a test on the compiled kernels and on the PyTorch kernels (``MONOFLOW_KERNELS=0``); returns the list the
    compiled solve appends to on every call, so a test can check which set served."""
    compiled = request.param == "compiled"
    if compiled and not all(fused.kernels_ready(dt, wait=True) for dt in (torch.float32, torch.float64)):
        pytest.skip("the compiled kernels are unavailable here")
    monkeypatch.setattr(SETTINGS, "use_kernels", compiled)
    return _count_solves(monkeypatch)


def _count_solves(monkeypatch):
    calls = []
    original = kernels.solve_run
    monkeypatch.setattr(kernels, "solve_run", lambda *a: (calls.append(1), original(*a))[1])
    return calls


def make_trainer() -> Trainer:
    # Learnable concatenation from the start (its gradient goes through the fold) and a fresh-sample test every
    # 3 steps (float64 evaluation on the CPU: the other dtype's kernels).
    model = FlowConfig(blocks=3, depth=2, growth=8, learnable_concat=True)
    train = TrainConfig(
        batch_size=256, lr=1e-2, concat_learnable_from=0, eval_every=3, eval_size=300, test_size=100, seed=11
    )
    return Trainer(model, train)


def run_steps(trainer: Trainer, steps: int, record: list, after_step=None) -> None:
    """Run ``steps`` steps, appending ``(step, loss, test NLL or None)`` to ``record``; ``after_step()`` after each."""

    def callback(m, ev):
        record.append((m.step, m.loss, None if ev is None else ev.nll_nats))
        if after_step is not None:
            after_step()

    trainer.run(steps, callback=callback)


def snapshot(trainer: Trainer, record: list) -> dict:
    """What must agree bit for bit: parameters and buffers, optimizer state, the callback's losses and test NLLs."""
    opt = trainer.optimizer.state_dict()
    return {
        "flow": {k: v.detach().clone() for k, v in trainer.flow.state_dict().items()},
        "optimizer": {
            (i, k): v.clone() if torch.is_tensor(v) else v
            for i, entry in opt["state"].items()
            for k, v in entry.items()
        },
        "groups": opt["param_groups"],
        "record": list(record),
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a["record"] == b["record"]
    assert a["flow"].keys() == b["flow"].keys()
    differing = [k for k in a["flow"] if not torch.equal(a["flow"][k], b["flow"][k])]
    assert not differing, f"{len(differing)} flow tensors differ, e.g. {differing[:3]}"
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["groups"] == b["groups"]
    for key, value in a["optimizer"].items():
        other = b["optimizer"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def straight_run(steps: int = STEPS) -> dict:
    trainer = make_trainer()
    record: list = []
    run_steps(trainer, steps, record)
    return snapshot(trainer, record)


def test_identical_runs_are_bit_identical(kernel_set):
    first = straight_run()
    assert bool(kernel_set) == SETTINGS.use_kernels  # the set the fixture chose served the run
    assert_identical(first, straight_run())
    assert any(ev is not None for _, _, ev in first["record"])  # (the tests ran, too)


def test_resumed_run_equals_straight_run_bit_for_bit(kernel_set, tmp_path):
    straight = straight_run()
    first = make_trainer()
    record: list = []
    run_steps(first, STEPS // 2, record)
    path = first.save_checkpoint(tmp_path / "run.safetensors")
    del first
    resumed = Trainer.resume(path)
    run_steps(resumed, STEPS - STEPS // 2, record)
    assert_identical(straight, snapshot(resumed, record))


def test_a_run_started_while_the_kernels_compile_uses_them_from_its_first_step(monkeypatch):
    """A compile under way in the background when the run starts (a caller started it without waiting, as the
    studio does): the first step waits for it instead of serving with the PyTorch kernels until it finishes, so the
    run equals one that started with the kernels ready."""
    if not fused.kernels_ready(torch.float32, wait=True):
        pytest.skip("the compiled kernels are unavailable here")
    reference = straight_run()
    calls = _count_solves(monkeypatch)
    monkeypatch.setitem(COMPILER.state, (torch.float32, "train"), "compiling")
    holding = threading.Event()

    def background_compile() -> None:  # holds the compile lock, as _compile_kernels does, then reports success
        with COMPILER.compile_lock:
            holding.set()
            threading.Event().wait(0.5)
            COMPILER.state[torch.float32, "train"] = "ready"

    thread = threading.Thread(target=background_compile)
    thread.start()
    try:
        assert holding.wait(10)
        assert not fused.kernels_ready(torch.float32)  # without waiting: still compiling
        trainer = make_trainer()
        record: list = []
        solves = []  # compiled solves so far, after each step
        run_steps(trainer, STEPS, record, after_step=lambda: solves.append(len(calls)))
    finally:
        thread.join()
    assert solves[0] > 0  # the compiled kernels served the first step
    assert_identical(reference, snapshot(trainer, record))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_first_use_inside_no_grad_compiles_every_kernel(monkeypatch, mode):
    """The first use of a dtype may come from an evaluation (no_grad or inference_mode), and the fused path then
    compiles in that thread; the warm-up differentiates the fold, so it must not inherit the caller's grad mode
    (it failed with 'does not require grad' and left the PyTorch kernels in charge for the whole process)."""
    if not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    dt = torch.float64
    assert fused.kernels_ready(dt, wait=True)
    for kit in KERNEL_SETS:  # as at the first use in a process (Numba's versions stay compiled)
        monkeypatch.delitem(COMPILER.state, (dt, kit))
    calls = _count_solves(monkeypatch)
    flow = build_flow(FlowConfig(blocks=2)).double()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with context:
            flow.log_prob(torch.randn(10, 2, dtype=dt))
            assert COMPILER.state[dt, "solve"] == "ready"
            assert len(calls) == 1 + 1  # the solvers' warm-up solve, then the evaluation's
            # the training kernels, asked for from inside no_grad too: their warm-up differentiates the fold
            assert fused.kernels_ready(dt, wait=True)
    assert COMPILER.state[dt, "train"] == "ready"
    assert len(calls) == 2 + 2  # and the training warm-up's two solves


_FRESH_RUN = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_determinism import make_trainer, run_steps, snapshot
trainer = make_trainer()
record = []
run_steps(trainer, {steps}, record)
torch.save(snapshot(trainer, record), {out!r})
"""


def test_a_fresh_process_with_default_settings_equals_this_one(tmp_path):
    """The reported case: a new process loads the compiled kernels from Numba's on-disk cache (about a second)
    while its run starts. With default settings its result must equal this process's run, whose kernels were
    ready before it started (tests/conftest.py)."""
    if not (SETTINGS.use_kernels and fused.kernels_ready(torch.float32, wait=True)):
        pytest.skip("the compiled kernels are unavailable here")
    out = tmp_path / "fresh.pt"
    env = {k: v for k, v in os.environ.items() if k != "MONOFLOW_KERNELS"}
    script = _FRESH_RUN.format(tests=str(REPO / "tests" / "core"), steps=STEPS, out=str(out))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    fresh = torch.load(out, weights_only=False)
    assert_identical(straight_run(), fresh)
