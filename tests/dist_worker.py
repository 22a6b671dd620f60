"""One data-parallel update of the tiny model, for tests/test_distributed.py; run under torchrun (gloo, CPU).

Every rank builds the same global batch of 8 rollouts and trains its share (rank r: samples r, r+world, ...),
as `vlrl train` does; the loss is normalised by the global counts and micro-batch passes are padded to the
busiest rank. Rank 0 writes the resulting gradients and loss to the file named on the command line.
Odd samples have no image, so with 2 ranks rank 1 never sees one, while the vision tower is trainable:
its idle vision pass is what keeps DDP's gradient reduction complete.
"""

import sys

import torch
from accelerate import Accelerator
from PIL import Image

from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
from vlrl.batch import plan_micro_batches
from vlrl.config import ModelConfig
from vlrl.records import Rollout
from vlrl.update import LossSettings, accumulate_gradients


def main(model_dir: str, out: str) -> None:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    adapter = Qwen3VLAdapter.from_config(ModelConfig(path=model_dir, dtype="float32", min_pixels=4096, max_pixels=16384))
    model = adapter.load_model(torch.float32).train()  # every parameter trainable, vision tower included
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(8):
        images = [Image.new("RGB", (64, 64 + 32 * (i % 4 == 0)), (30 * i, 100, 200))] if i % 2 == 0 else []
        prompt = adapter.encode_prompt(adapter.build_messages(f"Question {i}?", len(images)), images)
        comp = torch.randint(0, 390, (3 + i,), generator=g).tolist()
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=[0.0] * len(comp), finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    policy = adapter.policy(model, 1.0)
    full = adapter.build_batch(rollouts)
    with torch.no_grad():  # behavior logprobs near the policy's own
        own, _ = policy(full.input_ids, full.attention_mask, full.loss_mask, **full.model_inputs)
    for r, lp in zip(rollouts, own):
        n = len(r.completion_ids)
        r.logprobs = (lp[-n:] + 0.05 * torch.randn(n, generator=g)).tolist() if n else []
    policy = acc.prepare(policy)
    mine = rollouts[rank::world]
    batch = adapter.build_batch(mine)
    groups = plan_micro_batches(batch.attention_mask.sum(-1).tolist(), max_samples=1 + rank)
    counts = torch.tensor([batch.num_loss_tokens, float((batch.loss_mask.sum(-1) > 0).sum())], dtype=torch.float64)
    most = torch.tensor([float(len(groups))])
    counts, most = acc.reduce(counts, "sum"), acc.reduce(most, "max")
    sums = accumulate_gradients(policy, batch, groups, LossSettings(max_new_tokens=10, entropy_coef=0.01), acc.device,
                                accelerator=acc, total_tokens=float(counts[0]), total_sequences=float(counts[1]),
                                loss_scale=world, padding_passes=int(most) - len(groups))
    loss = acc.reduce(torch.tensor([sums["loss"]], dtype=torch.float64), "sum")
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in acc.unwrap_model(policy).named_parameters() if p.grad is not None}
        torch.save({"loss": float(loss), "grads": grads, "world": world}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
