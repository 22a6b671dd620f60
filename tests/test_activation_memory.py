"""`train.checkpoint_fraction = "auto"`: the chooser's arithmetic, by hand."""

import torch

from vlrl.activation_memory import GIB, choose, kinds, optimizer_state_bytes, step_up


def test_the_ladder_goes_none_then_selective_then_full():
    # 4 layers: levels 0..8; selective first (cheap recompute), then full
    assert [kinds(level, 4) for level in range(9)] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (2, 2),
                                                       (3, 1), (4, 0)]
    assert step_up(2, 4) == 3 and step_up(7, 4) == 8 and step_up(8, 4) == 8 and step_up(0, 36) == 9


def test_the_fastest_level_that_fits_by_hand():
    # 4 layers, static 10 GiB (weights + gradients); activations above it: all full 2, all selective 6, none 14
    # (so 1 GiB a level from full to selective, 2 GiB a level from selective to none)
    act = {8: 2 * GIB, 4: 6 * GIB, 0: 14 * GIB}
    fit = lambda budget, **kw: choose(4, act, 10 * GIB, budget * GIB, margin=0.0, **kw)  # noqa: E731
    assert fit(24).level == 0 and fit(24).predicted_peak == 24 * GIB  # everything kept
    assert fit(21).level == 2 and fit(21).predicted_peak == 20 * GIB  # 2 selective: 14 - 2 x 2 above 10
    assert fit(21).per_layer == 2 * GIB and fit(21).fraction == 0.0 and fit(21).selective == 0.5
    assert fit(15).level == 5 and fit(15).fraction == 0.25 and fit(15).selective == 0.75  # 10 + 6 - 1 = 15
    assert fit(13).level == 7 and fit(13).fraction == 0.75 and fit(13).selective == 0.25  # 10 + 6 - 3 = 13
    c = fit(13, extra=2 * GIB)  # AdamW's state to come: even all full (10 + 2 + 2) does not fit: all full, said
    assert c.level == 8 and c.predicted_peak == 14 * GIB
    assert fit(11).level == 8 and fit(11).bound == 12 * GIB  # nothing fits: every layer full (and it is said)
    # later micro-batches up to 1.5x this one's tokens: activations x 1.5 must fit, the prediction stays this step's
    c = fit(20, scale=1.5)
    assert c.level == 4 and c.bound == 19 * GIB and c.predicted_peak == 16 * GIB
    # a step of one micro-batch was probed without its gradients whole: a later step's are added to the bound
    c = fit(21, grads=3 * GIB)
    assert c.level == 3 and c.predicted_peak == 18 * GIB and c.bound == 21 * GIB
    # "none" never measured (it ran out of memory): no level below the lowest measured is chosen
    assert choose(4, {8: 2 * GIB, 4: 6 * GIB}, 10 * GIB, 100 * GIB, margin=0.0).level == 4
    assert fit(20.5).level == 2 and choose(4, act, 10 * GIB, int(20.5 * GIB)).level == 3  # 4% margin: 19.68 usable
    said = fit(13).describe()
    assert "3 recomputed whole, 1 selectively, 0 keep their activations (1.00 GiB a level)" in said
    assert "predicted peak 13.0 of 13.0 GiB" in said


def test_adamw_state_is_two_moments_per_trainable_parameter():
    params = [torch.zeros(10, 4, dtype=torch.bfloat16), torch.zeros(3)]
    assert optimizer_state_bytes(params) == 2 * (40 * 2 + 3 * 4)


class FakeCuda:
    """The memory a probe sees, by hand (no GPU here): allocated = what the tensors a test allocates say."""

    def __init__(self, monkeypatch, activations: dict[int, float], grads_gib: float, oom_below: int = -1):
        self.allocated, self.peak, self.activations, self.grads, self.oom_below = 10 * GIB, 0, activations, grads_gib, oom_below
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (100 * GIB, 100 * GIB))
        monkeypatch.setattr("vlrl.activation_memory.device_budget", lambda device: 100 * GIB)


def test_the_heads_logits_are_kept_where_they_pay_for_the_levels_they_cost():
    from vlrl.activation_memory import SELECTIVE_COST

    act = {8: 2 * GIB, 4: 6 * GIB, 0: 14 * GIB}  # as above: 2 GiB a level from none to selective, 1 from there
    fit = lambda budget, gain, **kw: choose(4, act, 10 * GIB, budget * GIB, margin=0.0, logits=2 * GIB,  # noqa: E731
                                            logits_gain=gain, **kw)
    c = fit(26, 1.0)  # everything kept and the logits too: 10 + 14 + 2
    assert c.level == 0 and c.keep_logits and c.predicted_peak == 26 * GIB
    c = fit(24, 3 * SELECTIVE_COST)  # with the logits: one level up (+0.1 layer forwards) for a 0.3 gain
    assert c.level == 1 and c.keep_logits and c.predicted_peak == 24 * GIB
    c = fit(24, 0.5 * SELECTIVE_COST)  # a gain smaller than that level's cost: no
    assert c.level == 0 and not c.keep_logits and c.predicted_peak == 24 * GIB
    c = fit(14, 5.0)  # full layers: 2 GiB of logits cost 2 full levels (2 layer forwards), worth a gain of 5
    assert c.level == 8 and c.keep_logits and c.bound == 14 * GIB and fit(14, 1.0).level == 6
    assert "the logprob head keeps its logits" in fit(26, 1.0).describe()


def test_probes_run_with_the_steps_gradients_allocated_and_predict_its_peak(monkeypatch):
    """A step of several micro-batches: from the second on, the gradients exist whole before the backward, so each
    probe runs with them allocated and the static memory is read with them; the predicted peak is static +
    measured activations + AdamW's state to come. A step of one micro-batch is probed as it runs."""
    from vlrl.activation_memory import AutoCheckpointing

    applied, seen = [], []
    auto = AutoCheckpointing(lambda f, s: applied.append((f, s)), 4, torch.device("cuda"))
    params = [torch.zeros(8, 4), torch.zeros(4)]  # 36 float32 values: 144 bytes of gradients, 288 of AdamW state
    # GiB above static by level: 1 a level from full to selective, 21 from there to none, which does not fit 96
    # GiB (100 less 4%)
    act = {level: 6 + (4 - level) * 21 if level < 4 else 10 - level for level in range(9)}
    fake = FakeCuda(monkeypatch, act, 0)

    def probe():
        seen.append([p.grad is not None for p in params])
        level = auto.level
        fake.peak = fake.allocated + act[level] * GIB
        for p in params:
            p.grad = None

    said = auto.decide(probe, params, False, lambda values, op: values, probe_tokens=1000, token_cap=1000)
    assert seen == [[True, True]] * 3 and [p.grad for p in params] == [None, None]
    assert applied[:3] == [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]
    # 1 selective, 3 keep: on the line from none (90) to all selective (6), 21 GiB a level: 10 + 69 GiB
    assert auto.level == 1 and applied[-1] == (0.0, 0.25)
    assert auto.choice.predicted_peak == 79 * GIB + 288 and "0 recomputed whole, 1 selectively, 3 keep" in said
    seen.clear()
    auto.decide(probe, params, True, lambda values, op: values, probe_tokens=1000, accumulates=False)
    assert seen == [[False, False]] * 3 and auto.choice.bound == 79 * GIB + 144  # (AdamW's state already counted)
    # a token cap twice the probe's: activations doubled must fit: 3 selective (27 GiB) is the first; the gap
    # below it is probed once, halved (level 1), and that probe lands on the line: no more
    seen.clear()
    auto.decide(probe, params, False, lambda values, op: values, probe_tokens=1000, token_cap=2000)
    assert auto.level == 3 and auto.choice.bound == 64 * GIB + 288 and auto.choice.predicted_peak == 37 * GIB + 288
    assert len(seen) == 4 and applied[-2] == (0.0, 0.25) and 1 in auto.measured
    # another rank needs more recomputation: the highest level, with this rank's prediction at it
    said = auto.decide(probe, params, False, lambda values, op: [8.0, 1.0], distributed=True, probe_tokens=1000)
    assert auto.level == 8 and applied[-1] == (1.0, 0.0) and "the highest of the ranks' choices" in said
    assert seen[-2:] == [[True, True]] * 2  # several ranks: only full and the middle of the full half probed


def test_auto_offload_is_kept_only_where_it_spares_layers_recomputed_whole(monkeypatch):
    """`offload_optimizer = "auto"`: the ladder is probed with the moments' fetch and without; the offload stays
    only when its choice recomputes fewer layers whole (its copies cost more than selective layers save), else
    the choice is the one without (all of AdamW's state counted)."""
    import pytest

    from vlrl.activation_memory import AutoCheckpointing, optimizer_state_bytes

    params = [torch.zeros(8, 4), torch.zeros(4)]
    state = optimizer_state_bytes(params)
    act = {8: 2, 4: 30, 0: 60}  # GiB above static by level, without the fetch: 7.5 a level selective, 7 full
    fake = FakeCuda(monkeypatch, act, 0)
    # (AdamW's state to come, GiB; offloaded, GiB; the fetch's GiB at the peak; kept; the level; predicted GiB)
    for to_come, offloaded, fetch_gib, kept, level, peak in (
            (60, 60, 0, True, 0, 70),  # on the host: everything kept; on the device: 1 layer full (10 + 60 + 23)
            (30, 30, 0, False, 1, 92.5),  # on the device: 1 selective (10 + 30 + 52.5), no full layer to spare
            (60, 60, 60, False, 5, 93),  # its fetch lands at the peak: 1 full layer either way
            (30, 0, 0, False, 1, 92.5)):  # (nothing offloaded: nothing to decide)
        monkeypatch.setattr("vlrl.activation_memory.optimizer_state_bytes", lambda p: to_come * GIB + state)
        auto = AutoCheckpointing(lambda f, s: None, 4, torch.device("cuda"))
        probes = []

        def probe(fetch=True):
            probes.append(fetch)
            fake.peak = fake.allocated + (act[auto.level] + (fetch_gib if fetch else 0.0)) * GIB

        said = auto.decide(probe, params, False, lambda values, op: values, probe_tokens=1000,
                           offloaded=offloaded * GIB, probe_without_offload=lambda: probe(False))
        case = (to_come, offloaded, fetch_gib)
        if offloaded:
            assert probes == [True] * 3 + [False] * 3, case
        assert auto.offload_declined == (offloaded > 0 and not kept), case
        assert auto.level == level and auto.choice.predicted_peak == pytest.approx(peak * GIB + state, abs=8), (case, said)


def _probe_by_table(auto, fake, act: dict[int, float], seen: list[int]):
    """A probe whose peak above static is `act[level]` GiB, out of memory past the fake GPU's 100 GiB."""
    def probe():
        seen.append(auto.level)
        if fake.allocated + act[auto.level] * GIB > 100 * GIB:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        fake.peak = fake.allocated + act[auto.level] * GIB
    return probe


def test_where_all_selective_runs_out_of_memory_the_levels_between_are_probed(monkeypatch):
    """Only all full was measured (all selective ran out of memory), which alone could only choose all full:
    the gap is halved by probes until the level below the choice is known not to fit."""
    from vlrl.activation_memory import AutoCheckpointing

    # 4 layers, static 10 GiB: 25 GiB a level from full (2) towards selective (102: out of memory)
    act = {level: 2 + (8 - level) * 25 for level in range(9)}
    fake = FakeCuda(monkeypatch, act, 0)
    seen = []
    auto = AutoCheckpointing(lambda f, s: None, 4, torch.device("cuda"))
    auto.decide(_probe_by_table(auto, fake, act, seen), [], True, lambda values, op: values)
    assert seen == [8, 4, 6, 5]  # the ladder (none is not probed after selective failed), then 6 and 5
    assert auto.level == 5 and auto.choice.predicted_peak == 87 * GIB  # 10 + 77: 1 full, 3 selective
    assert sorted(auto.measured) == [5, 6, 8]


def test_where_the_peaks_slope_changes_within_a_gap_probes_find_the_level_the_line_misses(monkeypatch):
    """With the optimizer offload the peak is the larger of two: the activations at the last backward's start
    (falling 8 GiB a level up the full half) and the moments fetched in it (70 GiB, flat). The line from all
    selective (88) to all full (70) would choose 6 of 8 layers full; the probes find 2 full is the first that fits."""
    from vlrl.activation_memory import AutoCheckpointing

    act = {level: max(88 - (level - 8) * 8, 70) if level >= 8 else 200 for level in range(17)}
    fake = FakeCuda(monkeypatch, act, 0)
    monkeypatch.setattr("vlrl.activation_memory.optimizer_state_bytes", lambda p: 10 * GIB)  # AdamW's, to come
    seen = []
    auto = AutoCheckpointing(lambda f, s: None, 8, torch.device("cuda"))
    auto.decide(_probe_by_table(auto, fake, act, seen), [], False, lambda values, op: values)
    # the limit: 96 GiB less static 10 and AdamW's 10 leaves 76 for activations. The line: level 14 (74.5)
    assert seen[:3] == [16, 8, 0] and seen[3:] == [11, 9]  # 11: 70, off the line (81.25); then 10 fits by it
    # 2 full, 6 selective; predicted on the line through 9 and 11 (75), above the real 72: never below it
    assert auto.level == 10 and auto.choice.predicted_peak == (10 + 10 + 75) * GIB


def test_a_micro_batch_that_never_fits_recomputes_everything_and_says_what_to_lower(monkeypatch):
    """Even the all-recomputed probe runs out of memory (injected: no GPU here): no crash in the chooser,
    every layer recomputed, and the sentence names the setting to change."""
    from vlrl.activation_memory import AutoCheckpointing

    FakeCuda(monkeypatch, {}, 0)
    applied = []
    auto = AutoCheckpointing(lambda f, s: applied.append((f, s)), 4, torch.device("cuda"))

    def probe():
        raise torch.OutOfMemoryError("CUDA out of memory")

    said = auto.decide(probe, [], False, lambda values, op: values)
    assert auto.fraction == 1.0 and applied == [(1.0, 0.0), (1.0, 0.0)] and "lower train.micro_batch_tokens" in said


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

    # a GPU whose budget fits half full
    def decide(self, probe, params, has_state, agree, distributed=False, **kw):
        probe()
        self._apply(3)  # 2 layers: level 3 = 1 layer full, 1 selective
        return "decided"

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
    assert said.count("out of GPU memory with 1 of 2 layers recomputed whole and 1 selectively: now 2") == 1

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(train_module, "accumulate_gradients", always)
    with pytest.raises(torch.OutOfMemoryError):
        train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=always"))


def _rank(rank: int, port: int, out):
    """One of two gloo ranks: its own memory budget (rank 1 has less), the same probe peaks; `agree` is the
    all-reduce `Run.over_ranks` does."""
    import torch.distributed as dist

    import vlrl.activation_memory as am

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        state = {"allocated": 10 * GIB, "peak": 0}
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        torch.cuda.memory_allocated = lambda *a: state["allocated"]
        torch.cuda.max_memory_allocated = lambda *a: state["peak"]
        torch.cuda.memory_reserved = lambda *a: 0
        torch.cuda.mem_get_info = lambda *a: (100 * GIB, 100 * GIB)
        am.device_budget = lambda device: 100 * GIB if rank == 0 else int(17.5 * GIB)
        act = {8: 2, 6: 10, 4: 18}
        kept = []
        head = am.Head(kept.append, GIB, 0.5)  # 1 GiB of logits worth half a layer's forward
        auto = am.AutoCheckpointing(lambda f, s: None, 4, torch.device("cuda"), head)

        def probe():
            state["peak"] = state["allocated"] + act[auto.level] * GIB

        def agree(values, op):
            t = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.tolist()

        said = auto.decide(probe, [], True, agree, distributed=True, probe_tokens=1000, probe_trained=1000)
        out.put((rank, auto.level, kept[-1], said))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_one_level_and_head_setting_over_gloo():
    """Two processes (gloo) with different budgets: each picks its own level from the same probes, and both apply
    the highest, with the logits kept by neither when one cannot keep them."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # probed: all full (2 GiB above 10 static) and half full, half selective (level 6, 10 GiB). Rank 0 (96 GiB
    # usable) alone: level 6 with the logits (2.2 - 0.5 < 2.2). Rank 1 (16.8 usable): level 7 (10 + 6) without;
    # with the logits only level 8 fits (4.0 - 0.5 > 3.1): so level 7, no logits kept, on both ranks
    assert [(r[1], r[2]) for r in got] == [(7, False), (7, False)]
    assert "the highest of the ranks' choices" in got[0][3] and "highest" not in got[1][3]


def _budget_probe(auto, fake, act16k: dict[int, float], budget: list[int]):
    """A probe whose peak above static is the piecewise line through `act16k` (GiB by level at 16,384 tokens),
    scaled by the budget being decided (`budget[0]`): half the tokens, half the activations."""
    from vlrl.activation_memory import predict

    def probe():
        act = {lv: int(g * GIB) for lv, g in act16k.items()}
        fake.peak = fake.allocated + predict(auto.layers, act, auto.level)[0] * budget[0] // 16384
    return probe


def test_the_token_budget_is_halved_while_layers_are_recomputed_whole(monkeypatch):
    """`decide_budget`: where the choice within `train.micro_batch_tokens` recomputes layers whole, the step is
    planned within half and chosen again (half the tokens, half the activations), down to the floor; a half that
    spares no full layer is undone, the choice within the larger budget restored."""
    from vlrl.activation_memory import AutoCheckpointing, kinds

    act = {8: 4, 4: 60, 0: 100}  # GiB above static by level at 16,384 tokens (4 layers)
    fake = FakeCuda(monkeypatch, act, 0)
    fake.allocated = 40 * GIB  # 56 GiB left for activations (96 less the static 40)
    applied = []
    auto = AutoCheckpointing(lambda f, s: applied.append((f, s)), 4, torch.device("cuda"))
    asked: list[int] = []
    budget = [0]

    def decide_at(tokens):
        asked.append(tokens)
        budget[0] = tokens
        return auto.decide(_budget_probe(auto, fake, act, budget), [], True, lambda values, op: values,
                           probe_tokens=tokens, token_cap=tokens)

    # 16,384: 1 layer full (46 GiB); 8,192: everything kept (50 GiB): halved once, and no further (0 full)
    tokens, said = auto.decide_budget(decide_at, 16384, 4096)
    assert tokens == 8192 and asked == [16384, 8192] and auto.level == 0 and applied[-1] == (0.0, 0.0)
    assert "micro-batches within 8192 tokens, not train.micro_batch_tokens = 16384" in said
    # the floor: max_model_len 16,384 allows no half
    asked.clear()
    tokens, said = auto.decide_budget(decide_at, 16384, 16384)
    assert tokens == 16384 and asked == [16384] and kinds(auto.level, 4) == (1, 3) and "micro-batches" not in said
    # static 70 (26 GiB left): 3 layers full at 16,384, 1 at 8,192, none at 4,096: halved twice
    fake.allocated = 70 * GIB
    asked.clear()
    tokens, _ = auto.decide_budget(decide_at, 16384, 4096)
    assert asked == [16384, 8192, 4096] and tokens == 4096 and kinds(auto.level, 4)[0] == 0
    # nothing fits at any budget (the static part alone is over it): every layer full either way, the half undone
    fake.allocated = 95 * GIB
    asked.clear()
    tokens, said = auto.decide_budget(decide_at, 16384, 4096)
    assert asked == [16384, 8192] and tokens == 16384 and auto.level == 8 and applied[-1] == (1.0, 0.0)
    assert auto.choice.bound == 95 * GIB + 4 * GIB and "micro-batches" not in said


def test_a_halved_token_budget_plans_every_step_within_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`vlrl train` with `auto`: where the choice within train.micro_batch_tokens recomputes layers whole (a fake
    GPU's: a level by the token cap), the first update plans again within half, down to max_model_len, and every
    later step is planned within the budget chosen: the same micro-batches and the same update as a run asking
    for that budget (streamed steps: tests/test_streamed_update.py)."""
    import pytest

    from vlrl.activation_memory import AutoCheckpointing, Choice
    from vlrl.summary import read_jsonl
    from vlrl.train import Run, train

    from conftest import tiny_config

    caps = []

    def decide(self, probe, params, has_state, agree, distributed=False, token_cap=None, **kw):
        probe()
        caps.append(token_cap)
        level = 2 + {2048: 2, 1024: 1}.get(token_cap, 0)  # 2 layers: level 2 + f = f full, 2 - f selective
        self.choice = Choice(level, 2, 0, 0, 0, 0)
        self._apply(level)
        return f"decided at {token_cap}"

    monkeypatch.setattr(AutoCheckpointing, "decide", decide)
    passes = []
    step_of = Run.optimizer_step

    def optimizer_step(self, params, sums, micro_batches):  # each step's micro-batches
        passes.append(micro_batches)
        return step_of(self, params, sums, micro_batches)

    monkeypatch.setattr(Run, "optimizer_step", optimizer_step)
    sets = ("train.gradient_checkpointing=true", 'train.checkpoint_fraction="auto"', "train.steps=3")
    step = ("rollout.prompts_per_step=4", "rollout.group_size=8")
    halved = train(tiny_config(tiny_model_dir, tmp_path, *sets, "train.micro_batch_tokens=2048", "name=halved",
                               step=step))
    said = " ".join(capsys.readouterr().out.split())  # (rich wraps its lines)
    assert caps == [2048, 1024, 512]
    assert "decided at 512; micro-batches within 512 tokens, not train.micro_batch_tokens = 2048" in said
    asked = train(tiny_config(tiny_model_dir, tmp_path, *sets, "train.micro_batch_tokens=512", "name=asked",
                              step=step))
    a, b = read_jsonl(halved.run_dir / "metrics.jsonl"), read_jsonl(asked.run_dir / "metrics.jsonl")
    assert passes[:3] == passes[3:] and min(passes) > 1
    for key in ("loss", "grad_norm", "reward/mean"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-5, abs=1e-7), key
