"""The benches' own diagnostics (bench/ragged.py): what they print must name the right thing."""

import sys
from pathlib import Path
from types import SimpleNamespace as NS

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ragged  # noqa: E402


def test_each_product_kernel_is_charged_to_the_op_and_shapes_that_launched_it():
    slow, fast = "cutlass_75_tensorop_bf16_s1688gemm_bf16_256x128_nn_align1", "nvjet_sm90_tst_256x128"

    def op(name, shapes, kernel=None, us=0.0):
        launched = [NS(name=kernel, device=0, duration=us)] if kernel else []
        return NS(name=name, input_shapes=shapes, kernels=launched)

    weight_grad = [[32, 13000], [13000, 4096]]
    events = [
        op("aten::linear", [[13000, 4096], [32, 4096]]),  # the outer op launches no kernel itself
        op("aten::mm", [[13000, 4096], [4096, 32]], fast, 40.0),
        op("aten::mm", weight_grad, slow, 9000.0),
        op("aten::mm", weight_grad, slow, 8800.0),
        op("aten::add_", [[32, 4096], [32, 4096]], "elementwise", 99999.0),  # not a product
        op("aten::addmm", [[4096], [13000, 4096], [4096, 4096]], fast, 1500.0),
    ]
    rows = ragged.kernels_by_product(events)
    assert rows[0] == (slow, "aten::mm", str(weight_grad), 17.8, 2)
    assert [r[1] for r in rows] == ["aten::mm", "aten::addmm", "aten::mm"]  # most time first; no add_
    assert rows[1][2] == str([[4096], [13000, 4096], [4096, 4096]]) and rows[1][3:] == (1.5, 1)
    assert len(ragged.kernels_by_product(events, rows=1)) == 1


def test_a_real_profile_of_a_product_on_this_machine_goes_through():
    """A real profiler's events (CPU here: products launch no GPU kernels, so nothing is charged)."""
    from torch.profiler import ProfilerActivity, profile

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.nn.functional.linear(a, b.T)
        a @ b
    assert any(e.name == "aten::mm" and e.input_shapes for e in prof.events())
    assert ragged.kernels_by_product(prof.events()) == []


def test_head_gemm_times_each_product_and_the_head_as_trained():
    """bench/head_gemm.py --cpu: a row per product and chunk size, then token_logprobs' forward + backward
    with logits recomputed and kept (on the GPU the same with the kernels each ran)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "head_gemm.py"), "--cpu"], capture_output=True,
                         text=True, timeout=300, cwd=root, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 4,099 |")]
    assert len(rows) == 2 * 5 + 2  # chunk sizes 64 and 128, five products each; then the head as trained
    trained = [r for r in rows if "token_logprobs" in r[2]]
    assert [r[1] for r in trained] == ["300", "300"]
    assert ["recomputed" in trained[0][2], "kept" in trained[1][2]] == [True, True]
    assert all(float(r[4]) > 0 for r in rows)  # ms


def test_update_step_prints_the_ragged_batch_as_shipped():
    """bench/update_step.py --tiny --auto --optimizer --auto-only --ragged-only: the ragged batch with `auto`
    and offload_optimizer = "auto" as `Run.update` decides them (on the CPU every layer recomputed), the
    offload's exactness against AdamW's own, and the `ragged as shipped` line."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    flags = ["--tiny", "--auto", "--optimizer", "--auto-only", "--ragged-only"]
    out = subprocess.run([sys.executable, str(root / "bench" / "update_step.py"), *flags],
                         capture_output=True, text=True, timeout=600, cwd=root, check=True).stdout
    lines = out.splitlines()
    assert "max |weight diff| 0.0e+00, max |moment diff| 0.0e+00" in out
    shipped = [line for line in lines if line.startswith("ragged as shipped (auto, AdamW, offload auto: ")]
    assert len(shipped) == 1 and "fraction 1.00 (2 full, 0 selective, 0 keep)" in shipped[0], out[-2000:]
