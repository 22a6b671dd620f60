"""`train.checkpoint_fraction = "auto"`: the chooser's arithmetic, by hand."""

import torch

from vlrl.activation_memory import GIB, choose, levels, optimizer_state_bytes, step_up


def test_the_least_recomputation_that_fits():
    # 4 layers; measured: all recomputed 10 GiB, 2 layers kept 12 GiB (1 a layer), 4 kept 18 GiB (3 a layer)
    peaks = {0: 10 * GIB, 2: 12 * GIB, 4: 18 * GIB}
    fit = lambda budget, extra=0, p=peaks: choose(4, p, budget * GIB, extra * GIB, margin=0.0)  # noqa: E731
    assert fit(20).fraction == 0.0 and fit(20).predicted_peak == 18 * GIB  # none recomputed
    assert fit(17).fraction == 0.25 and fit(17).predicted_peak == 15 * GIB  # 3 kept: on the line from 2 to 4
    # AdamW's state to come: 11 + 4
    assert fit(15, extra=4).fraction == 0.75 and fit(15, extra=4).per_layer == 1 * GIB
    assert fit(9).fraction == 1.0  # nothing fits: recompute everything (and say so)
    # 4 kept was never measured (it ran out): not chosen
    assert fit(30, p={0: 10 * GIB, 2: 12 * GIB}).fraction == 0.5
    assert choose(4, peaks, 15 * GIB).fraction == 0.5  # the default 6% margin: 14.1 GiB usable
    assert "25% of 4 layers recomputed (3 keep their activations, 3.00 GiB each)" in fit(17).describe(4)


def test_fractions_are_whole_layers_and_step_up_by_a_quarter():
    assert levels(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert step_up(0.25, 36) == 0.5 and step_up(0.75, 36) == 1.0 and step_up(1.0, 36) == 1.0
    assert step_up(0.0, 2) == 0.5  # at least one layer more


def test_adamw_state_is_two_moments_per_trainable_parameter():
    params = [torch.zeros(10, 4, dtype=torch.bfloat16), torch.zeros(3)]
    assert optimizer_state_bytes(params) == 2 * (40 * 2 + 3 * 4)


def test_a_micro_batch_that_never_fits_recomputes_everything_and_says_what_to_lower(monkeypatch):
    """Even the all-recomputed probe runs out of memory (injected: no GPU here): no crash in the chooser,
    every layer recomputed, and the sentence names the setting to change."""
    from vlrl.activation_memory import AutoCheckpointing

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    applied = []
    auto = AutoCheckpointing(applied.append, 4, torch.device("cuda"))

    def probe():
        raise torch.OutOfMemoryError("CUDA out of memory")

    said = auto.decide(probe, [], False, lambda values, op: values)
    assert auto.fraction == 1.0 and applied == [1.0, 1.0] and "lower train.micro_batch_tokens" in said


def test_auto_on_the_cpu_recomputes_every_layer_and_says_so(tiny_model_dir, tmp_path, capsys):
    from vlrl.summary import read_jsonl
    from vlrl.train import train

    from conftest import tiny_config

    res = train(tiny_config(tiny_model_dir, tmp_path, "train.gradient_checkpointing=true",
                            'train.checkpoint_fraction="auto"', "train.steps=2"))
    assert [m["checkpoint_fraction"] for m in read_jsonl(res.run_dir / "metrics.jsonl")] == [1.0, 1.0]
    assert capsys.readouterr().out.count("auto on the CPU recomputes every layer") == 1


def test_an_out_of_memory_error_steps_the_fraction_up_once_and_redoes_the_step(
    tiny_model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """An OOM in the update (injected: these machines have no GPU) steps `auto`'s fraction up by a quarter of
    the layers, redoes the step from zeroed gradients (the same update as a step that never failed), says so
    once; at every layer recomputed it is raised, not looped on."""
    import pytest

    import vlrl.train as train_module
    from vlrl.activation_memory import AutoCheckpointing
    from vlrl.summary import read_jsonl
    from vlrl.train import train

    from conftest import tiny_config

    # a GPU whose budget fits half recomputed
    def decide(self, probe, params, has_state, agree, distributed=False):
        probe()
        self._apply(0.5)
        return "decided 50%"

    monkeypatch.setattr(AutoCheckpointing, "decide", decide)
    sets = ("train.gradient_checkpointing=true", 'train.checkpoint_fraction="auto"', "train.steps=2")
    clean = train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=clean"))
    real, calls = train_module.accumulate_gradients, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first step's update, after the probe
            weight = args[0].model.model.language_model.layers[0].mlp.gate_proj.weight
            weight.grad = torch.ones_like(weight)  # a backward that died midway: half-summed gradients
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "accumulate_gradients", fails_once)
    capsys.readouterr()
    oom = train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=oom"))
    said = capsys.readouterr().out
    a, b = read_jsonl(clean.run_dir / "metrics.jsonl"), read_jsonl(oom.run_dir / "metrics.jsonl")
    assert ([m["checkpoint_fraction"] for m in a] == [0.5, 0.5]
            and [m["checkpoint_fraction"] for m in b] == [1.0, 1.0])
    for key in ("loss", "grad_norm", "reward/mean"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5, abs=1e-7), key
    assert said.count("out of GPU memory with 50% of the layers recomputed: now 100%") == 1

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(train_module, "accumulate_gradients", always)
    with pytest.raises(torch.OutOfMemoryError):
        train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=always"))
