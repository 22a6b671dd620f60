"""The policy update of one step: micro-batched forward, loss and backward, gradients accumulated.

The loss is normalised once, by counts over the whole step (all micro-batches, all ranks), so the
gradient is the same however the step is split (tested with 1, 2 and 4 micro-batches).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import torch

from .algo.losses import aggregation_weights, k3, kl_k3, policy_loss
from .batch import MultimodalBatch, batch_logprobs
from .planner import StepPlan

_REDUCE = {"sum": lambda a, b: a + b, "max": max, "min": min}  # how each logged number accumulates
_HOW = {"max_abs_diff": "max", "log_ratio_max": "max", "log_ratio_min": "min"}  # how these accumulate: the
# others add up, over a step's micro-batches (accumulate_gradients) and its calls (merge_sums)


def merge_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The logged numbers of two `accumulate_gradients` calls of one step, as one call over both would give."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _REDUCE[_HOW.get(key, "sum")](out[key], value) if key in out else value
    return out


def accumulate_gradients(
    policy: torch.nn.Module,
    batch: MultimodalBatch,
    plan: StepPlan | list[list[int]],
    settings,  # config.AlgorithmConfig: the loss's settings (policy_loss, clips, aggregation, kl/entropy coefs)
    max_new_tokens: int,  # rollout.max_new_tokens: Dr.GRPO's constant normaliser
    device: torch.device | str = "cpu",
    ref_policy: torch.nn.Module | None = None,
    accelerator=None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    loss_scale: float = 1.0,
    padding_passes: int = 0,
    before_backward=None,
) -> dict[str, float]:
    """Forward/backward every micro-batch of `plan` (packed or padded; a plain list of sample-index groups is
    a padded plan); gradients accumulate in the params.

    `total_tokens` / `total_sequences` are the step's global counts (defaults: the plan's, else this batch's
    own); `loss_scale` undoes the data-parallel gradient averaging (pass the world size). `padding_passes`
    (default: the plan's) extra passes of the last micro-batch with zero weight keep this rank in step with
    ranks that have more micro-batches (their collectives must match one for one). `before_backward(i, last)`
    is called before pass i's backward (`optimizer_offload.StateOffload`'s). Returns sums for logging.
    """
    if not isinstance(plan, StepPlan):
        plan = StepPlan(plan, packed=False)
    if padding_passes:
        plan = replace(plan, padding_passes=padding_passes)
    total_tokens = plan.total_tokens if total_tokens is None else total_tokens
    total_sequences = plan.total_sequences if total_sequences is None else total_sequences
    if settings.kl_coef > 0 and ref_policy is None:
        raise ValueError("kl_coef > 0 needs a reference policy")
    if total_tokens is None:
        total_tokens = float(batch.loss_mask.sum())
    if total_sequences is None:
        total_sequences = float((batch.loss_mask.sum(-1) > 0).sum())
    module = _configure(policy, settings, accelerator)
    aux_coef = settings.router_aux_loss_coef
    sums = dict.fromkeys(
        ["loss", "tokens", "clipped_tokens", "masked_tokens", "ratio_sum", "mismatch_kl_sum", "entropy_sum", "kl_sum",
         "max_abs_diff", "padded_tokens", "attended_tokens", "log_ratio_sum", "log_ratio_sq_sum"],
        0.0,
    )
    sums["log_ratio_min"], sums["log_ratio_max"] = 0.0, 0.0
    pending: list[tuple[str, torch.Tensor]] = []  # (key, a 0-d tensor): read at the end

    def later(key: str, value: torch.Tensor) -> None:
        pending.append((key, value.detach()))

    passes = plan.passes
    for i, (g, weight) in enumerate(passes):
        mb = plan.micro_batch(batch, g).to(device)  # padded [b, l] or packed [1, T]; loss tensors [b, l] either way
        last = i == len(passes) - 1
        # DDP reduces gradients once, after the last pass; FSDP2 reduce-scatters every pass (its no_sync would
        # keep whole unsharded gradients on every rank).
        defer = accelerator is not None and not last and accelerator.distributed_type.name != "FSDP"
        sync = accelerator.no_sync(policy) if defer else nullcontext()
        autocast = accelerator.autocast() if accelerator is not None else nullcontext()
        with sync, autocast:
            logp, entropy = batch_logprobs(policy, mb)  # [b, l] each
            mask = mb.loss_mask
            tok_loss, st = policy_loss(logp, mb.behavior_logprobs, mb.advantages, mask, settings)
            if settings.kl_coef > 0:
                with torch.no_grad():
                    ref_lp, _ = batch_logprobs(ref_policy, mb)
                kl = kl_k3(logp, ref_lp) * mask
                tok_loss = tok_loss + settings.kl_coef * kl
                later("kl_sum", kl.detach().sum())
            if settings.entropy_coef > 0:
                tok_loss = tok_loss - settings.entropy_coef * entropy * mask
            w = aggregation_weights(mask, settings.aggregation, total_tokens, total_sequences, max_new_tokens)
            loss = (tok_loss * w).sum() * weight
            aux = getattr(module, "aux_loss", None) if aux_coef > 0 else None
            if aux is not None:
                # the router's load balance, each micro-batch weighted by its share of the step's trained
                # tokens (so splitting the step does not change it)
                share = mask.sum() / total_tokens
                loss = loss + aux_coef * aux * share * weight
                later("router_aux_loss", aux.detach() * share)
            if before_backward is not None:
                before_backward(i, last)
            if accelerator is not None:
                accelerator.backward(loss * loss_scale)
            else:
                (loss * loss_scale).backward()
        if weight == 0.0:
            continue
        with torch.no_grad():
            d = ((logp - mb.behavior_logprobs) * mask).double()
            later("loss", loss)
            later("tokens", mask.sum())
            later("mismatch_kl_sum", (k3(d) * mask).sum())
            if d.numel():
                later("max_abs_diff", d.abs().max())
                on = mask > 0  # (no trained token: +inf / -inf, which the 0.0 they start from absorbs)
                later("log_ratio_min", d.masked_fill(~on, math.inf).min())
                later("log_ratio_max", d.masked_fill(~on, -math.inf).max())
            later("log_ratio_sum", d.sum())
            later("log_ratio_sq_sum", (d * d).sum())
            later("entropy_sum", (entropy * mask).sum())
            sums["padded_tokens"] += float(mb.computed_tokens)  # token positions computed, padding included
            sums["attended_tokens"] += float(mb.real_tokens)
            routed = mb.model_inputs.get("routed_experts")  # [b, l, layers, k] (packed [1, T, ...])
            if routed is not None and getattr(module, "routing_replay", False):
                later("routing_replayed_tokens", (routed >= 0).flatten(2).any(-1).sum())
            for k, v in st.items():
                later(k, v)
    # every logged number read from the GPU in one transfer, after the last backward is queued: a read per
    # number and micro-batch made the host wait for the GPU, and the GPU idle until the host caught up
    values = torch.stack([v.reshape(()).double() for _, v in pending]).tolist() if pending else []
    for (key, _), value in zip(pending, values):
        sums[key] = _REDUCE[_HOW.get(key, "sum")](sums.get(key, 0.0), value)
    return sums


def _configure(policy, settings, accelerator=None):
    """The policy module inside its wrapper, told the loss settings its forward reads: routing replay and the
    router's load-balancing loss (mixture-of-experts policies have these attributes; others ignore them)."""
    module = accelerator.unwrap_model(policy) if accelerator is not None else policy
    configure_policy(module, settings)
    return module


def configure_policy(module, settings) -> None:
    """Set a policy's mixture-of-experts switches from the algorithm settings (no-op for a dense policy)."""
    if hasattr(module, "routing_replay"):
        module.routing_replay = settings.routing_replay is not False
    if hasattr(module, "collect_router_aux"):
        module.collect_router_aux = settings.router_aux_loss_coef > 0
