"""One data-parallel update of the tiny model, for tests/test_distributed.py; run under torchrun (gloo, CPU).

Every rank builds the same global batch of 8 rollouts and trains its share (rank r: samples r, r+world, ...),
as `vlrl train` does; the loss is normalised by the global counts and micro-batch passes are padded to the
busiest rank. Rank 0 writes the resulting gradients and loss to the file named on the command line.
Odd samples have no image, so with 2 ranks rank 1 never sees one, while the vision tower is trainable:
its idle vision pass is what keeps DDP's gradient reduction complete. Mode `multiturn`: every rollout is a
two-turn trajectory whose environment reply holds an image on even samples (rank 0's) and text on odd ones.

Mode `packed` is `vlrl train`'s default path instead: rank 0 starts with samples 0-5, rank 1 with 6-7;
`plan_step` balances them across ranks by tokens (rollouts sent between ranks) and packs micro-batches.
"""

import sys

import torch
from accelerate import Accelerator
from PIL import Image

from vlrl.adapters import load_adapter
from vlrl.batch import plan_micro_batches
from vlrl.config import AlgorithmConfig, ModelConfig, TrainConfig
from vlrl.fsdp import prepare_on_cpu
from vlrl.planner import plan_step
from vlrl.records import Rollout
from vlrl.update import accumulate_gradients


def gathered(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(model_dir: str, out: str, mode: str = "ddp") -> None:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    adapter = load_adapter(ModelConfig(path=model_dir, dtype="float32", min_pixels=4096,
                                       max_pixels=16384))  # (the checkpoint's family: Qwen3-VL or Qwen3.5)
    model = adapter.load_model(torch.float32).train()  # every parameter trainable, vision tower included
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(8):
        images = [Image.new("RGB", (64, 64 + 32 * (i % 4 == 0)), (30 * i, 100, 200))] if i % 2 == 0 else []
        prompt = adapter.encode_prompt(adapter.build_messages(f"Question {i}?", len(images)), images)
        comp = torch.randint(0, 390, (3 + i,), generator=g).tolist()
        r = Rollout(prompt=prompt, completion_ids=comp, logprobs=[0.0] * len(comp), finish_reason="length",
                    advantage=float(torch.randn(1, generator=g)))
        rollouts.append(two_turns(adapter, r, i % 2 == 0, g) if mode == "multiturn" else r)
    policy = adapter.policy(model, 1.0)
    full = adapter.build_batch(rollouts)
    with torch.no_grad():  # behavior logprobs near the policy's own
        own, _ = policy(full.input_ids, full.attention_mask, full.loss_mask, **full.model_inputs)
    for r, lp in zip(rollouts, own):
        n = len(r.completion_ids)
        p = len(r.prompt.input_ids)
        mask = torch.tensor(r.trained_mask, dtype=torch.float32)
        r.logprobs = ((lp[p : p + n] + 0.05 * torch.randn(n, generator=g)) * mask).tolist() if n else []
    policy = prepare_on_cpu(acc, policy, adapter.fsdp_units) if mode == "fsdp" else acc.prepare(policy)
    if mode == "multiturn":  # rank 0 trains the tool images, rank 1 none at all
        assert all(r.env_images for r in rollouts[0::2]) and not any(r.env_images for r in rollouts[1::2])
    settings = AlgorithmConfig(entropy_coef=0.01)
    result = {"world": world}
    if mode == "packed":
        mine = rollouts if world == 1 else (rollouts[:6] if rank == 0 else rollouts[6:])
        reduce = lambda v, op: acc.reduce(torch.tensor(v, dtype=torch.float64), op).tolist()  # noqa: E731
        batch, plan = plan_step(mine, [], adapter.build_batch, TrainConfig(micro_batch_tokens=80), None,
                                world, reduce)
        assert plan.packed
        sums = accumulate_gradients(policy, batch, plan, settings, 10, acc.device, accelerator=acc,
                                    loss_scale=world)
        # per rank, after balancing
        result["tokens"] = acc.gather(torch.tensor([sum(batch.lengths)])).tolist()
        result["passes"] = len(plan.passes)
    else:
        mine = rollouts[rank::world]
        batch = adapter.build_batch(mine)
        groups = plan_micro_batches(batch.attention_mask.sum(-1).tolist(), max_samples=1 + rank)
        counts = torch.tensor([batch.num_loss_tokens, float((batch.loss_mask.sum(-1) > 0).sum())],
                              dtype=torch.float64)
        most = torch.tensor([float(len(groups))])
        counts, most = acc.reduce(counts, "sum"), acc.reduce(most, "max")
        sums = accumulate_gradients(policy, batch, groups, settings, 10, acc.device, accelerator=acc,
                                    total_tokens=float(counts[0]), total_sequences=float(counts[1]),
                                    loss_scale=world,
                                    padding_passes=int(most) - len(groups))
    loss = acc.reduce(torch.tensor([sums["loss"]], dtype=torch.float64), "sum")
    grads = {n: gathered(p.grad).clone() for n, p in acc.unwrap_model(policy).named_parameters()
             if p.grad is not None}
    result.update(loss=float(loss), grads=grads)
    if mode == "fsdp":
        result.update(fsdp_state_round_trip(acc, adapter, policy))
    if rank == 0:
        torch.save(result, out)
    acc.wait_for_everyone()


def two_turns(adapter, r: Rollout, image: bool, g) -> Rollout:
    """`r` as a two-turn trajectory: its turn, an environment reply (a tool message, with an image or not), a
    second sampled turn."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": "the tool's answer"}]
    reply = adapter.encode_reply([{"role": "tool", "content": content}],
                                 [Image.new("RGB", (64, 96), (200, 100, 0))] if image else [])
    second = torch.randint(0, 390, (4,), generator=g).tolist()
    ids = r.completion_ids + reply.input_ids + second
    mask = [1] * len(r.completion_ids) + [0] * len(reply.input_ids) + [1] * len(second)
    return Rollout(prompt=r.prompt, completion_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop",
                   completion_mask=mask, advantage=r.advantage, env_images=reply.images,
                   env_pixel_values=reply.pixel_values, env_image_grid_thw=reply.image_grid_thw, turns=2)


def fsdp_state_round_trip(acc, adapter, policy) -> dict:
    """After an optimizer step: the gathered weights and optimizer state, a fresh sharded policy loaded from
    them (as a resumed run is), and an unsharded replica refreshed from the shards (the in-process
    sampler's)."""
    from vlrl.fsdp import copy_full_weights, full_state, load_optimizer_state, optimizer_state

    params = lambda pol: [p for p in pol.parameters() if p.requires_grad]  # noqa: E731
    opt = torch.optim.AdamW(params(policy), lr=1e-2)
    opt.step()
    weights, ostate = full_state(policy), optimizer_state(policy, opt)
    replica = adapter.load_model(torch.float32)
    copy_full_weights(policy, replica)
    replica_diff = max(float((gathered(p) - dict(replica.named_parameters())[n[len("model."):]]).abs().max())
                       for n, p in policy.named_parameters())
    policy2 = prepare_on_cpu(acc, adapter.policy(adapter.load_model(torch.float32).train(), 1.0),
                             adapter.fsdp_units)
    # the fresh shards get the gathered weights from rank 0 (a resumed run reads them from the checkpoint)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(policy2, {f"model.{k}": v for k, v in weights.items()},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    opt2 = torch.optim.AdamW(params(policy2), lr=1e-2)
    load_optimizer_state(policy2, opt2, ostate)
    weights2, ostate2 = full_state(policy2), optimizer_state(policy2, opt2)
    return {"weights": weights, "weights2": weights2, "opt": ostate, "opt2": ostate2,
            "replica_diff": replica_diff,
            "step_weights": {n: gathered(p).detach().clone() for n, p in policy.named_parameters()}}


if __name__ == "__main__":
    main(*sys.argv[1:])
