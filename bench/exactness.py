"""bf16 gradients against a float32 reference: is vlrl's path further from the truth than the naive path is?

`update_step.py` compares vlrl's bf16 gradients with the naive path's bf16 gradients. Where the two differ by
more than a few percent (Qwen3.5: 1.5e-1 for fla's delta rule against transformers', 2.0e-1 packed against
padded) that alone cannot say which is off: both are bf16. This runs, on the same random weights and the same
ragged batch (mixed completion lengths, right-padded where padded):

- the reference: the naive path (transformers' own forward, full logits, float32 log-softmax; Qwen3.5: its
  PyTorch Gated DeltaNet rule) with the model in float32 (TF32 off);
- vlrl's path in float32, padded and packed (each must equal the reference to float32 rounding);
- in bf16: the naive path, vlrl padded, vlrl packed (`--micro-batch-tokens`; Qwen3.5: `--delta-rule`).

and prints each run's relative gradient error against the reference per parameter group (the worst parameter
of the group), then the ratio of each vlrl bf16 run's error to the naive bf16 run's, group by group: a
ratio near 1 means vlrl's path is as exact as the naive one, and what is left is bf16's. Last line:
`exactness: ...`.

    python bench/exactness.py --family qwen3.5 --layers 4 --delta-rule fla --images 0
                                        # on a GPU: Qwen3.5-9B cut to 4 layers (3 Gated DeltaNet + 1), text
    python bench/exactness.py --family qwen3-vl --layers 4                   # Qwen3-VL-8B cut to 4 layers
    python bench/exactness.py --tiny --family qwen3.5                        # the tiny model, on the CPU

Measured: bench/README.md ("bf16 against float32").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragged  # noqa: E402  (bench/ragged.py, beside this script)
import update_step as ub  # noqa: E402  (bench/update_step.py: the naive path, the architectures)

from vlrl.adapters.linear_attention import has_linear_attention, set_delta_rule  # noqa: E402
from vlrl.adapters.patches import patch_model  # noqa: E402
from vlrl.config import AlgorithmConfig  # noqa: E402
from vlrl.planner import StepPlan, pack_micro_batches  # noqa: E402
from vlrl.update import accumulate_gradients  # noqa: E402

# parameter groups, first match wins (a Qwen3.5 Gated DeltaNet's decay parameters' gradients are sums over
# every token, with cancellation: bf16 moves them most)
GROUPS = (("decay (A_log, dt_bias)", ("A_log", "dt_bias")), ("conv1d", ("conv1d",)),
          ("linear attention", ("linear_attn",)), ("attention", ("self_attn",)), ("mlp", ("mlp",)),
          ("embedding, head, norms", ("embed_tokens", "lm_head", "norm")))


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def cut(cfg, layers: int | None):
    """`cfg` with its language model cut to its first `layers` decoder layers."""
    if layers:
        text = cfg.text_config
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
    return cfg


def build_model(args):
    """(float32 model, device): the tiny model on the CPU, or the family's architecture, cut, on the GPU."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    if args.tiny:
        import tempfile

        from vlrl.adapters import build_tiny_model

        path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", args.family)
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), torch.device("cpu")
    cfg = cut(ub.qwen3_5_9b_config() if args.family == "qwen3.5" else ub.qwen3_vl_8b_config(), args.layers)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return model, torch.device("cuda")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model of --family, on the CPU")
    ap.add_argument("--family", choices=["qwen3-vl", "qwen3.5"], default="qwen3.5")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (not with --tiny)")
    ap.add_argument("--delta-rule", choices=["torch", "fla", "transformers"], default="transformers",
                    help="Qwen3.5: the gated delta rule of vlrl's path (the reference and the naive path run "
                         "transformers' PyTorch rule)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts of the ragged batch")
    ap.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--images", type=int, choices=[0, 1], default=1, help="one image per prompt, or none")
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="the packed run's token budget (default: half the batch's tokens, so 2 or more)")
    ap.add_argument("--json", type=Path, help="write the table and the ratios here too")
    args = ap.parse_args(argv)

    model, device = build_model(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a float32 reference
    patch_model(model)
    cfg = model.config
    if has_linear_attention(model.model.language_model):
        set_delta_rule(model.model.language_model, args.delta_rule)
        model._bench_delta_rule = args.delta_rule  # (the naive path switches to transformers' PyTorch rule)
    vocab = cfg.text_config.vocab_size
    big = vocab > 150000
    adapter = ub.bench_adapter(cfg.image_token_id, cfg.video_token_id, ub.PAD if big else 0,
                               ub.IM_END if big else 1, max_model_len=1 << 20)
    spec = ragged.RaggedSpec.tiny() if args.tiny else ragged.RaggedSpec(median=300.0, longest=1024)
    spec.prompts, spec.group = args.prompts, args.group
    image = adapter.image_token_id
    markers = (ub.VISION_START, ub.VISION_END) if big else (image - 2, image - 1)
    rollouts = ragged.ragged_rollouts(adapter, spec, vocab, *markers)
    if not args.images:
        rollouts = [dataclasses.replace(r, prompt=_text_only(r.prompt, {image, *markers}))
                    for r in rollouts]
    batch = adapter.build_batch(rollouts)
    settings = AlgorithmConfig()  # (the naive path has no entropy bonus: neither has this)
    whole = [list(range(batch.size))]
    budget = args.micro_batch_tokens or max(max(batch.lengths), (sum(batch.lengths) + 1) // 2)
    packed = StepPlan(pack_micro_batches(batch.lengths, budget, batch.patches_per_sample), packed=True)
    ub.set_trainable(model, vision=False, checkpointing=True)
    ragged.own_logprobs(adapter.policy(model, 1.0), batch, StepPlan(whole, packed=False), device)

    # the reference's gradients wait on the host (float64 on the CPU, float32 beside a GPU: a 9B cut to 4
    # layers has 3B trainable parameters); each run is reduced to its errors at once, its gradients dropped
    keep = torch.float64 if device.type == "cpu" else torch.float32

    def errors(m, ref=None) -> dict[str, float]:
        out = {}
        for n, p in m.named_parameters():
            if p.grad is None:
                continue
            if ref is None:
                out[n] = p.grad.detach().to(keep).cpu()
                continue
            out[n] = ub.rel_err(p.grad.to(keep), ref[n].to(p.device))
        m.zero_grad(set_to_none=True)
        return out

    def naive(m, ref=None):
        ub.naive_update(m, batch.to(device), settings, ragged.MAX_NEW_TOKENS, adapter.banned_token_ids,
                        matmul_patch_embed=True)
        return errors(m, ref)

    def vlrl(m, plan, ref):
        accumulate_gradients(adapter.policy(m, 1.0), batch, plan, settings, ragged.MAX_NEW_TOKENS, device)
        return errors(m, ref)

    print(f"{batch.size} rollouts, lengths {min(batch.lengths)}..{max(batch.lengths)}, "
          f"{sum(batch.lengths):,} tokens; packed: {len(packed.micro_batches)} micro-batch(es)", flush=True)
    ref = naive(model)
    assert any(float(g.abs().max()) > 0 for g in ref.values()), "the reference has no gradient"
    runs, failed = {}, {}

    def run(name, fn):
        try:
            runs[name] = fn()
        except Exception as e:  # (fla in float32, say): said, and the other runs go on
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {name}: {failed[name]}", flush=True)

    run("vlrl, float32, padded", lambda: vlrl(model, whole, ref))
    run("vlrl, float32, packed", lambda: vlrl(model, packed, ref))
    half = copy.deepcopy(model).to(torch.bfloat16)
    model = None  # (its memory back before the bf16 runs)
    run("naive, bf16", lambda: naive(half, ref))
    run("vlrl, bf16, padded", lambda: vlrl(half, whole, ref))
    run("vlrl, bf16, packed", lambda: vlrl(half, packed, ref))
    result = report(list(ref), runs, device)
    result["failed"] = failed
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _text_only(prompt, dropped: set[int]):
    """A prompt without its image (its placeholders and vision markers: `dropped`)."""
    from vlrl.records import EncodedPrompt

    return EncodedPrompt(input_ids=[t for t in prompt.input_ids if t not in dropped], messages=[], images=[])


def report(names: list[str], runs: dict[str, dict[str, float]], device) -> dict:
    """Print and return {run: {group: (worst error, its parameter)}} and the ratios to the naive bf16 run,
    from each run's relative error per parameter against the reference (`names`: its parameters)."""
    assert all(set(e) == set(names) for e in runs.values()), "the runs trained different parameters"
    groups = [g for g, _ in GROUPS + (("other", ()),) if any(group_of(n) == g for n in names)]
    table: dict[str, dict[str, tuple[float, str]]] = {}
    for run, errs in runs.items():
        table[run] = {g: max((errs[n], n) for n in names if group_of(n) == g) for g in groups}
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{dev}, torch {torch.__version__}: relative gradient error against the naive path in float32 "
          "(worst parameter of each group)")
    print("| run | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
    for run, row in table.items():
        print(f"| {run} | " + " | ".join(f"{row[g][0]:.1e}" for g in groups) + " |")
    naive = table.get("naive, bf16")
    ratios = {}
    for run in ("vlrl, bf16, padded", "vlrl, bf16, packed"):
        if naive is None or run not in table:
            continue
        ratios[run] = {g: table[run][g][0] / max(naive[g][0], 1e-12) for g in groups}
        print(f"| {run} / naive, bf16 | " + " | ".join(f"{ratios[run][g]:.2f}" for g in groups) + " |")
    print("\nworst parameters: " + "; ".join(f"{run}: {max(row.values())[1]} {max(row.values())[0]:.1e}"
                                             for run, row in table.items()))
    f32 = [v[0] for run in ("vlrl, float32, padded", "vlrl, float32, packed") if run in table
           for v in table[run].values()]
    said = [f"vlrl float32 (padded, packed) vs float32 reference {max(f32):.1e}" if f32 else "no float32 run"]
    if "vlrl, bf16, packed" in ratios:
        packed = ratios["vlrl, bf16, packed"]
        worst = max(groups, key=lambda g: packed[g])
        said.append(f"bf16 packed at most {packed[worst]:.2f}x the naive bf16 path's error ({worst}: "
                    f"{table['vlrl, bf16, packed'][worst][0]:.1e} against {naive[worst][0]:.1e})")
    print("exactness: " + "; ".join(said), flush=True)
    return {"table": table, "ratios": ratios, "groups": groups}


if __name__ == "__main__":
    main()
