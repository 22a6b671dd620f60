"""`train.offload_optimizer`: AdamW's moments on the host between steps, exactly AdamW.

On the CPU the copies are plain copies (no pinned memory, no copy stream): what is tested here is the
bookkeeping (which moments move, when, what a failed update or a checkpoint sees) and that training is
unchanged bit for bit.
The GPU side (the copy stream, the overlap, the memory it frees) is measured by `bench/update_step.py --auto
--optimizer --offload-optimizer` on the GPU machine (bench/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlrl.config import load_config
from vlrl.optimizer_offload import StateOffload
from vlrl.summary import read_jsonl
from vlrl.train import train

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"time/rollout", "time/rollout_wait", "time/update", "time/update_overlapped", "time/sync",
          "time/sync_blocking", "time/step", "tokens_per_s"}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _steps(model, opt, offload, steps: int = 3, passes: int = 2) -> None:
    """`steps` optimizer steps of `passes` accumulated micro-batches each, as `Run.update` drives them."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for i in range(passes):
            x = torch.randn(5, 6, generator=gen)
            loss = model(x).pow(2).mean()
            if offload is not None:
                offload.before_backward(i, i == passes - 1)
            loss.backward()
        if offload is not None:
            offload.before_step()
        opt.step()
        if offload is not None:
            offload.after_step()
        opt.zero_grad(set_to_none=True)


def _assert_same_training(plain, opt_a, params, opt_b) -> None:
    """Weights and AdamW moments equal bit for bit."""
    for a, b in zip(plain.parameters(), params):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[a][k], opt_b.state[b][k])


def test_offloaded_moments_are_adamw_bit_for_bit_and_live_on_the_host_between_steps():
    plain, moved = _model(), _model()
    params = list(moved.parameters())
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    # from the last parameter back: the last Linear's bias and weight and the middle bias (67 values, two
    # float32 moments each: 536 bytes) fit in 600; the middle weight (256 values) does not
    offload = StateOffload(opt_b, params, limit=600, device="cpu")
    assert offload.chosen == [params[5], params[4], params[3]] and offload.bytes == 2 * 4 * (3 + 48 + 16)
    _steps(plain, opt_a, None)
    _steps(moved, opt_b, offload)
    _assert_same_training(plain, opt_a, params, opt_b)
    assert set(offload.host) == set(offload.chosen)  # the chosen moments are the host copies between steps
    assert all(opt_b.state[p][k] is offload.host[p][k] for p in offload.chosen
               for k in ("exp_avg", "exp_avg_sq"))
    assert offload.fetched == {}


def test_restored_moments_stay_on_the_device_and_the_steps_go_on_as_adamw():
    """`offload_optimizer = "auto"` declined at the first update: `restore` brings the moments back for good
    (no host copy, no hook), and the steps after are AdamW's own."""
    plain, moved = _model(), _model()
    params = list(moved.parameters())
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    offload = StateOffload(opt_b, params, limit=10**6, device="cpu")
    _steps(plain, opt_a, None, steps=2)
    _steps(moved, opt_b, offload, steps=2)
    hosts = {p: dict(offload.host[p]) for p in params}
    offload.restore()
    assert offload.host == {} and offload.handles == []
    assert all(opt_b.state[p][k] is not hosts[p][k] and torch.equal(opt_b.state[p][k], hosts[p][k])
               for p in params for k in ("exp_avg", "exp_avg_sq"))
    _steps(plain, opt_a, None, steps=2)
    _steps(moved, opt_b, None, steps=2)
    _assert_same_training(plain, opt_a, params, opt_b)


def test_the_last_pass_fetches_each_moment_as_its_gradient_is_final():
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    offload = StateOffload(opt, params, limit=10**6, device="cpu")  # everything
    _steps(model, opt, offload, steps=1)
    seen = []
    x = torch.randn(5, 6)
    offload.before_backward(0, last=False)  # an earlier pass: nothing moves
    model(x).sum().backward()
    assert offload.fetched == {}
    offload.before_backward(1, last=True)
    hook = params[0].register_post_accumulate_grad_hook(lambda p: seen.append(set(offload.fetched)))
    model(x).sum().backward()
    hook.remove()
    # by the first layer's gradient, the layers above had theirs fetched (its own hook ran just before)
    assert set(params[2:]) <= seen[0] and len(offload.fetched) == len(params)
    offload.drop()  # a failed update: the fetched copies go, the host's stay
    assert offload.fetched == {}
    assert all(opt.state[p]["exp_avg"] is offload.host[p]["exp_avg"] for p in params)


def test_fetches_wait_for_the_memory_the_backward_frees_and_the_steps_stay_adamw():
    """Paced fetches (a stand-in for the device's allocated bytes: what the backward has freed so far, plus
    the moments fetched): the memory never goes above what was allocated when the last backward began, the
    head's moments wait until a layer below has freed room, what is still queued is fetched before the step,
    and the steps are AdamW's own bit for bit."""
    plain, moved = _model(), _model()
    params = list(moved.parameters())
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    hooks, order = [0], []
    def count(i):
        def hook(p):
            hooks[0] += 1
            order.append(i)
        return hook

    for i, p in enumerate(params):  # registered before the offload's: they run first
        p.register_post_accumulate_grad_hook(count(i))
    offload = StateOffload(opt_b, params, limit=10**6, device="cpu")
    moment_bytes = lambda ps: sum(2 * p.numel() * p.element_size() for p in ps)  # noqa: E731
    freed_per_hook = 100  # bytes of activations each parameter's backward frees, in this stand-in
    seen = []

    def allocated():
        now = 10_000 + moment_bytes(offload.fetched) - freed_per_hook * hooks[0]
        seen.append((now, len(offload.queue), len(offload.fetched)))
        return now

    arm = offload.before_backward

    def before_backward(i, last):
        hooks[0] = 0
        order.clear()
        arm(i, last)

    offload.allocated, offload.before_backward = allocated, before_backward
    _steps(plain, opt_a, None)
    _steps(moved, opt_b, offload)
    _assert_same_training(plain, opt_a, params, opt_b)
    assert seen and all(now <= 10_000 for now, _, _ in seen)  # never above the backward's start
    assert max(q for _, q, _ in seen) >= 2  # fetches waited behind the memory not yet freed
    assert set(order[:2]) == {4, 5}  # the head (the last Linear) is final first
    assert offload.fetched == {} and set(offload.host) == set(params)
    offload.pace = False  # unpaced: no ceiling, each moment fetched in its own hook
    offload.before_backward(0, last=True)
    assert offload.ceiling is None
    offload.drop()


def test_before_the_first_step_the_last_pass_allocates_what_a_fetch_would():
    """`auto` checkpointing probes before AdamW has made its moments: the probe's last pass allocates their
    size anyway, so the measured peak holds the fetches a later step makes."""
    model = _model()
    params = list(model.parameters())
    offload = StateOffload(torch.optim.AdamW(params), params, limit=10**6, device="cpu")
    offload.before_backward(0, last=True)
    model(torch.randn(2, 6)).sum().backward()
    assert sum(t.numel() for t in offload.simulated) == 2 * sum(p.numel() for p in params)
    offload.drop()
    assert offload.simulated == []


def _cfg(tiny_model_dir, tmp_path, *extra):
    return load_config(ROOT / "configs/tiny-cpu.toml",
                       tiny_overrides(tiny_model_dir, tmp_path, "checkpoint.every=2", *extra))


def test_training_with_the_state_offloaded_repeats_the_plain_run_and_resumes_exactly(tiny_model_dir,
                                                                                     tmp_path):
    """Four steps with the moments on device == two steps with them offloaded, a checkpoint, and two more
    resumed with them offloaded: every logged number and every weight (one micro-batch a step: the same
    sums)."""
    def run(steps, name, offload, resume=False):
        return train(_cfg(tiny_model_dir, tmp_path, f"train.steps={steps}", f"name={name}",
                          f"train.offload_optimizer={offload}"), resume=resume)

    def logged(res):
        rows = read_jsonl(res.run_dir / "metrics.jsonl")
        return [{k: v for k, v in m.items() if k not in TIMING} for m in rows]

    plain = run(4, "plain", "false")
    assert run(2, "moved", "true").step == 2
    second = run(4, "moved", "true", resume=True)
    a, b = logged(plain), logged(second)
    assert len(a) == 4 and a == b
    from safetensors.torch import load_file

    wa = load_file(next((plain.run_dir / "step-4").glob("*.safetensors")))
    wb = load_file(next((second.run_dir / "step-4").glob("*.safetensors")))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offloading_under_fsdp_is_refused_with_what_to_do():
    from vlrl.train import Run

    class _FSDPRun(Run):
        def __init__(self, cfg):  # only what _offload reads
            self.cfg, self.fsdp, self.messages = cfg, True, []

    cfg = load_config(ROOT / "configs/tiny-cpu.toml", ["train.offload_optimizer=true"])
    with pytest.raises(Exception, match="under FSDP2 each rank holds a shard"):
        _FSDPRun(cfg)._offload([], on_gpu=True)
    cfg = load_config(ROOT / "configs/tiny-cpu.toml", ["train.offload_optimizer=\"auto\""])
    assert _FSDPRun(cfg)._offload([], on_gpu=True) is None
