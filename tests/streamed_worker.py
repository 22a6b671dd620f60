"""One streamed step (streamed_update.py) of the tiny model under torchrun, for tests/test_distributed.py.

Every rank samples the same four groups of three rollouts (the embedded sampler, seed 0; random advantages,
logprobs off the model's). With one process the step is `Run.update` over all of them; with two, rank r
streams groups r, r + 2 into a `StreamedUpdate` (DDP: no gradient reduced before its last pass); mode
`uneven`: rank 0 streams all four and rank 1 none (its last pass is a zero-weight one). Rank 0
writes the gradients the optimizer is given, and the logged loss, to the file named on the command line."""

import sys

import torch
from PIL import Image

from vlrl.config import RolloutConfig
from vlrl.rollout.embedded import EmbeddedSampler
from vlrl.streamed_update import StreamedUpdate
from vlrl.train import Run

from conftest import tiny_config


def sampled_groups(adapter, model) -> list[list]:
    """Four groups of three rollouts (prompts with 0, 1, 2, 0 images), random advantages, logprobs off the
    model's so ratios differ from 1 (clipping and masking take part). The same on every rank."""
    prompts = []
    for i in range(4):
        imgs = [Image.new("RGB", (64 + 32 * (i % 2), 64), (50 * i, 20, 200))] * (i % 3)
        prompts.append(adapter.encode_prompt(adapter.build_messages(f"Question {i}?", len(imgs)), imgs))
    sampler = EmbeddedSampler(model, adapter, RolloutConfig(max_new_tokens=12))
    rollouts = sampler.sample(prompts, 3, seed=0)
    g = torch.Generator().manual_seed(0)
    for r in rollouts:
        r.advantage = float(torch.randn(1, generator=g))
        r.logprobs = [lp + 0.3 * float(torch.randn(1, generator=g)) for lp in r.logprobs]
    return [rollouts[i * 3:(i + 1) * 3] for i in range(4)]


def main(model_dir: str, out_dir: str, out: str, mode: str = "even") -> None:
    # (a budget of about two rollouts: the passes before each rank's last run as its groups come)
    cfg = tiny_config(model_dir, out_dir, "name=streamed", "train.micro_batch_tokens=100",
                      "model.max_model_len=100")
    run = Run(cfg)
    groups = sampled_groups(run.adapter, run.adapter.load_model(torch.float32).eval())
    seen = {}
    step = run.optimizer_step

    def spy(params, sums, micro_batches):
        module = run.accelerator.unwrap_model(run.policy)
        seen["grads"] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        seen["sums"] = step(params, sums, micro_batches)
        return seen["sums"]

    run.optimizer_step = spy
    if run.world == 1:
        run.update([r for g in groups for r in g], [])
        loss = seen["sums"]["loss"]
    else:
        assert run.why_not_streamed() is None, run.why_not_streamed()
        streamed = StreamedUpdate(run)
        mine = groups[run.rank::run.world] if mode == "even" else (groups if run.rank == 0 else [])
        for g in mine:
            streamed.add(g)
        early = run.over_ranks([float(streamed.micro_batches)], "min")[0]  # passes run before the step's end
        streamed.finish()
        loss = run.over_ranks([seen["sums"].get("loss", 0.0)], "sum")[0]  # (train pools the ranks' sums)
    if run.rank == 0:
        torch.save({"grads": seen["grads"], "loss": loss, "world": run.world,
                    "early": early if run.world > 1 else None}, out)
    if run.world > 1:  # an orderly end: a rank torn down while the other still saved aborted ~4 runs in 30
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
