"""A short supervised warm start that makes the tiny Qwen-vocabulary model call tools
(`vlrl build-tiny-model DIR --vocab qwen --warm-start-tools`).

A random model over 151,936 tokens never writes a 45-token tool call by chance, so without this its episodes
end after one turn and the multi-turn token contract (stitching, tool results, tool images, the server's
prompt ids checked every turn) would go untested with the real vocabulary. It trains, on the built-in `zoom`
and `calculator` prompts exactly as the rollout layer renders them (tool schemas in the system turn), the
first assistant turn: a crop of a quadrant (the one holding the square, most of the time) or a `calculate`
call of the question's expression, in Qwen3-VL's `<tool_call>` format, then `<|im_end|>`. Seeded, 160 steps
of 4 examples with a decaying rate (about 3 minutes on 2 CPU cores). Measured with check-batch on 2 zoom
prompts x 16 (64 new tokens, 3 turns): a crop image in 16 of 32 first turns at temperature 1.0 and in 32 of
32 at 0.5; later turns (never trained) are mostly malformed calls, as a weak model's are. (80 steps at a
constant rate gave 3 of 32 at 1.0.)
"""

from __future__ import annotations

import random
from pathlib import Path


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as Qwen3-VL's chat template writes one (`<tool_call>\\n{json}\\n</tool_call>`)."""
    import json

    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def _targets(samples, rng: random.Random) -> list[str]:
    out = []
    for s in samples:
        if s.images:  # zoom: the quadrant that holds the square, or another one now and then
            box = s.images[0].info["box"]
            qx, qy = (box[0] // 128) * 128, (box[1] // 128) * 128
            if rng.random() < 0.3:
                qx, qy = rng.choice((0, 128)), rng.choice((0, 128))
            out.append(tool_call_text("crop", {"x0": qx, "y0": qy, "x1": qx + 128, "y1": qy + 128}))
        else:  # calculator: "What is 12 * 34? Use the calculator."
            expression = s.question.removeprefix("What is ").split("?")[0]
            out.append(tool_call_text("calculate", {"expression": expression}))
    return [t + "<|im_end|>" for t in out]


def warm_start_tools(model_dir: str | Path, steps: int = 160, batch: int = 4, lr: float = 5e-3, seed: int = 0,
                     progress=None) -> list[float]:
    """Train `model_dir`'s first assistant turns on tool calls and save it in place; returns the loss per
    step."""
    import torch

    from .adapters.qwen3_vl import Qwen3VLAdapter
    from .batch import batch_logprobs
    from .config import EnvConfig, ModelConfig
    from .data.encode import encode_samples
    from .data.sources import load_samples
    from .envs.calculator import CalculatorEnv
    from .envs.zoom import ZoomEnv
    from .records import Rollout

    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = Qwen3VLAdapter.from_config(ModelConfig(path=str(model_dir), dtype="float32", min_pixels=4096,
                                                     max_pixels=16384, max_model_len=2048))
    examples = []
    for task, env in (("zoom", ZoomEnv()), ("calculator", CalculatorEnv())):
        cfg = EnvConfig(dataset=f"builtin:{task}", train_size=64)
        samples = load_samples(cfg, "train", seed)
        prompts, kept, _ = encode_samples(adapter, samples, cfg, env.schemas())
        for prompt, target in zip(prompts, _targets(kept, rng)):
            ids = adapter.tokenizer(target, add_special_tokens=False)["input_ids"]
            examples.append(Rollout(prompt=prompt, completion_ids=ids, logprobs=[0.0] * len(ids),
                                    finish_reason="stop"))
    model = adapter.load_model(torch.float32)
    model.train()
    model.model.visual.requires_grad_(False)
    # (151,936 rows: the decoder layers and the head learn)
    model.get_input_embeddings().requires_grad_(False)
    policy = adapter.policy(model, 1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # linear decay to a tenth: a constant rate leaves the per-token loss noisy (0.2..0.7), and most sampled
    # calls broken; the decay lets it settle
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps - 1))
    losses = []
    for step in range(steps):
        mb = adapter.build_batch(rng.sample(examples, batch))
        lp, _ = batch_logprobs(policy, mb)  # [b, l]: the targets' logprobs
        loss = -(lp * mb.loss_mask).sum() / mb.loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, steps, losses[-1])
    model.eval()
    adapter.save_pretrained(model, Path(model_dir))
    return losses
