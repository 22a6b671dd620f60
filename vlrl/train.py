"""`vlrl train`: the RL loop, read top to bottom.

Every step: sample prompts -> roll out a group per prompt -> score rewards -> group advantages (dynamic
sampling drops groups with no signal and refills) -> build the batch -> micro-batched update under
Accelerate (loss normalised once by the step's trained-token count) -> optimizer step -> weight sync to the
sampler -> metrics -> checkpoint. One optimizer step per batch of rollouts, with the ratio taken against the
sampler's own logprobs (algo/losses.py), so no extra "old logprob" pass is needed.

A run is resumable: `--resume` reloads the newest checkpoint (weights, optimizer, scheduler, data position)
and continues on the same data order; sampling is seeded per step, so a resumed run repeats the metrics of
an uninterrupted one. Ctrl-C finishes or drops the current step, saves a checkpoint and exits.
"""

from __future__ import annotations

import json
import math
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, save_config
from .errors import UserError
from .fsdp import copy_full_weights, full_state, is_fsdp, load_optimizer_state, optimizer_state
from .metrics import log_bad_samples, log_samples, pool, step_metrics, step_stats
from .planner import plan_step
from .records import Rollout
from .update import LossSettings, accumulate_gradients


class StopFlag:
    """First Ctrl-C asks the loop to stop at the next safe point; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class StepRollouts:
    rollouts: list[Rollout]  # every scored rollout of the kept groups
    trained: list[Rollout]  # the ones that enter the loss
    per_fn: dict[str, list[float | None]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    groups_dropped: int = 0
    bad_samples: list = field(default_factory=list)  # [(sample, reason)] skipped by env.on_bad_sample
    rounds: int = 0
    seconds: float = 0.0  # time spent sampling and scoring


class Run:
    """Everything a run holds: config, model, optimizer, sampler, data, logs."""

    def __init__(self, cfg: Config, resume: bool = False):
        from accelerate import Accelerator
        from transformers import get_scheduler

        from .adapters.qwen3_vl import Qwen3VLAdapter
        from .checkpoint import latest_checkpoint, load_trainer_state
        from .envs.rewards import RewardSet
        from .envs.sources import load_samples
        from .envs.stream import PromptStream
        from .rollout import make_sampler
        from .runtime import quiet_libraries, resolve_dtype

        quiet_libraries()
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt = latest_checkpoint(self.run_dir) if resume else None
        if resume and self.ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {self.run_dir}; start without --resume")
        if not resume and (self.run_dir / "metrics.jsonl").exists():
            raise UserError(
                f"run directory {self.run_dir} already holds a run; pass --resume to continue it, or choose "
                "another name (--set name=...)"
            )
        precision = cfg.train.precision
        on_gpu = torch.cuda.is_available()
        mixed = "bf16" if (precision == "bf16" or (precision == "auto" and on_gpu)) else "no"
        trackers = list(cfg.logging.trackers) or None
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not on_gpu, log_with=trackers,
                                       project_dir=str(self.run_dir) if trackers else None)
        self.fsdp = is_fsdp(self.accelerator)
        if self.fsdp:
            if self.accelerator.state.fsdp_plugin.fsdp_version != 2:
                raise UserError("FSDP1 is not supported: set fsdp_version: 2 in the Accelerate config "
                                "(configs/accelerate/fsdp2-*.yaml)")
            if cfg.model.lora_rank > 0:
                raise UserError("LoRA with FSDP is not supported: LoRA weights fit every GPU, so use DDP "
                                "(configs/accelerate/ddp-*.yaml), or set model.lora_rank = 0 for full-parameter FSDP")
        self.device = self.accelerator.device
        torch.manual_seed(cfg.train.seed)

        self.adapter = Qwen3VLAdapter.from_config(cfg.model)
        self.dtype = dtype = resolve_dtype(cfg, self.device)
        self.model = self.adapter.load_model(dtype, self.device, weights_from=self._weights_dir())
        self.adapter.prepare_for_training(self.model, cfg, adapter_dir=self.ckpt)
        self.policy = self.adapter.policy(self.model, cfg.rollout.temperature, fused_head=cfg.train.compile)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.train.learning_rate, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay,
            fused=on_gpu,
        )
        schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.lr_schedule]
        self.scheduler = get_scheduler(schedule, self.optimizer, cfg.train.warmup_steps, cfg.train.steps)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, self.optimizer, self.scheduler)
        self.ref_policy = None
        if cfg.algorithm.kl_coef > 0:
            ref = self.adapter.load_model(dtype, self.device).eval().requires_grad_(False)
            self.ref_policy = self.adapter.policy(ref, cfg.rollout.temperature)
        # Under FSDP no rank holds the whole policy: the in-process sampler gets an unsharded replica per rank,
        # refreshed after every step (sync_weights), so ranks sample independently.
        self.replica = None
        if self.fsdp and not cfg.rollout.server_url:
            self.replica = self.adapter.load_model(dtype, self.device, weights_from=self._weights_dir())
            self.replica.eval().requires_grad_(False)
        self.sampler = make_sampler(cfg, self.adapter.generation_model(self.replica or self.model), self.adapter,
                                    rank=self.accelerator.process_index)
        if self.accelerator.num_processes > 1 and cfg.rollout.one_step_off_policy:
            raise UserError("rollout.one_step_off_policy runs with one training process only (for now)")
        self.rewards = RewardSet(cfg.env.rewards, cfg.env.reward_timeout_s)
        self.settings = LossSettings.from_config(cfg)

        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.step = 0
        data_state = {"index": 0}
        if self.ckpt is not None:
            state = load_trainer_state(self.ckpt)
            load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            ranks = state["data"]
            if len(ranks) != self.world:
                raise UserError(f"{self.ckpt} was written by {len(ranks)} process(es); resume it with as many "
                                f"(this run has {self.world})")
            data_state = ranks[self.rank]
            torch.set_rng_state(state["torch_rng"])
        # A server may hold other weights (another run, an older step): start from the trainer's.
        self.sync_weights()
        samples = load_samples(cfg.env, "train", cfg.train.seed)
        self.stream = PromptStream(samples, cfg.train.seed, self.rank, self.world, **data_state)
        # This rank's share of a step's prompts (rank r takes prompts r, r + world, ...).
        self.local_prompts = len(range(self.rank, cfg.rollout.prompts_per_step, self.world))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.toml")
        self.image_dir = self.run_dir / "images"
        if trackers:
            self.accelerator.init_trackers(cfg.logging.project, config=flat_config(cfg),
                                           init_kwargs={"wandb": {"name": cfg.name, "dir": str(self.run_dir)}})
        self.eval_samples = None

    def _weights_dir(self) -> str | None:
        """Full-parameter runs resume from the checkpoint's weights; LoRA runs from the base + adapter."""
        if self.ckpt is None or self.cfg.model.lora_rank > 0:
            return None
        return str(self.ckpt)

    # --- one step --------------------------------------------------------------------------------------
    def collect(self, step: int) -> StepRollouts:
        """Roll out groups until `prompts_per_step` groups carry signal (or the refill bound is reached).

        `step` (0-based) seeds the sampler, so a resumed run samples what an uninterrupted one would."""
        from .algo.advantages import group_advantages, zero_variance_groups
        from .envs.dataset import encode_samples

        t0 = time.perf_counter()
        cfg = self.cfg
        kept: list[list[Rollout]] = []
        out = StepRollouts([], [])
        per_fn: dict[str, list] = {s.fn: [] for s in cfg.env.rewards}
        # Groups dropped by dynamic sampling and skipped bad samples are refilled, within a bound.
        for rnd in range(1 + cfg.algorithm.max_refill_rounds):
            need = self.local_prompts - len(kept)
            if need <= 0:
                break
            prompts, samples, bad = encode_samples(self.adapter, self.stream.take(need), cfg.env)
            out.bad_samples.extend(bad)
            if not prompts:
                continue
            seed = (cfg.rollout.seed * 1_000_003 + step * 101 + rnd) * self.world + self.rank
            rollouts = self.sampler.sample(prompts, cfg.rollout.group_size, seed=seed)
            for r in rollouts:
                r.sample = samples[r.group]
            result = self.rewards.score([r.text for r in rollouts], [r.sample for r in rollouts])
            for k, v in result.failures.items():
                out.failures[k] = out.failures.get(k, 0) + v
            rewards = torch.tensor([math.nan if t is None else t for t in result.total], dtype=torch.float64)
            groups = torch.tensor([r.group for r in rollouts])
            adv = group_advantages(rewards, groups, cfg.algorithm.advantage, cfg.algorithm.std_normalize)
            dead = zero_variance_groups(rewards, groups) if cfg.algorithm.dynamic_sampling else set()
            for i, r in enumerate(rollouts):
                r.reward = float(rewards[i])
                r.advantage = float(adv[i])
            for g in range(len(prompts)):
                if g in dead:
                    out.groups_dropped += 1
                    continue
                members = [i for i, r in enumerate(rollouts) if r.group == g]
                kept.append([rollouts[i] for i in members])
                for name, values in result.per_fn.items():
                    per_fn[name].extend(values[i] for i in members)
            out.rounds = rnd + 1
        for gi, members in enumerate(kept):
            for r in members:
                r.group = gi
        out.rollouts = [r for members in kept for r in members]
        out.per_fn = per_fn
        out.trained = [
            r
            for r in out.rollouts
            if not math.isnan(r.reward) and not (cfg.algorithm.mask_truncated and r.finish_reason == "length")
        ]
        out.seconds = time.perf_counter() - t0
        return out

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world == 1:
            return values
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.device), op).tolist()

    def update(self, trained: list[Rollout], fallback: list[Rollout]) -> dict[str, float]:
        """One optimizer step on this rank's `trained` rollouts. With several ranks, the loss is normalised by
        the counts of all ranks, and every rank runs as many forward/backward passes as the busiest one (a
        rank with nothing to train runs zero-weight passes over `fallback`), so collectives stay in step."""
        cfg = self.cfg
        if self.world == 1 and not trained:
            return {}
        batch, plan = plan_step(trained, fallback or [self.adapter.empty_rollout()], self.adapter.build_batch, cfg.train,
                                self.adapter.packing_unavailable(self.model), self.world, self._reduce)
        if plan.total_tokens == 0:
            return {}
        self.policy.train()
        sums = accumulate_gradients(self.policy, batch, plan, self.settings, self.device, self.ref_policy,
                                    self.accelerator, loss_scale=self.world)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(grad_norm)
        sums["micro_batches"] = len(plan.micro_batches)
        return sums

    # --- bookkeeping -----------------------------------------------------------------------------------
    def trainer_state(self, data_state: dict | None = None) -> dict:
        return {
            "step": self.step,
            "optimizer": optimizer_state(self.policy, self.optimizer),  # by parameter name; gathered under FSDP
            "scheduler": self.scheduler.state_dict(),
            "data": data_state or self.stream.state(),
            "torch_rng": torch.get_rng_state(),
        }

    def evaluate(self) -> dict:
        """Score the current policy on the eval split; returns `eval/...` metrics."""
        from .envs.sources import load_samples
        from .evaluate import evaluate

        cfg = self.cfg
        if self.eval_samples is None:
            samples = load_samples(cfg.env, "eval", cfg.train.seed)
            self.eval_samples = samples[: cfg.eval.limit] if cfg.eval.limit else samples
        n = cfg.eval.n or cfg.rollout.group_size
        summary = evaluate(cfg, self.adapter, self.sampler, self.eval_samples, n, cfg.rollout.seed,
                           self.run_dir / f"eval-step-{self.step}", info={"step": self.step, "split": "eval"})
        return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "seed"}

    def save(self, data_state: dict | None = None) -> Path | None:
        """Checkpoint (every rank's data position in it); the main process writes, the others wait."""
        from .checkpoint import save_checkpoint

        state = self.trainer_state(data_state)
        if self.world > 1:
            from accelerate.utils import gather_object

            state["data"] = gather_object([state["data"]])
        else:
            state["data"] = [state["data"]]
        weights = full_state(self.policy) if self.fsdp else None  # every rank takes part in the gather
        path = None
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.policy).model
            path = save_checkpoint(self.run_dir, self.step, lambda d: self.adapter.save_pretrained(model, d, weights),
                                   state, self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def sync_weights(self) -> None:
        """Send the updated weights to the sampler: a server gets them once (from the main process)."""
        model = self.adapter.generation_model(self.accelerator.unwrap_model(self.policy).model)
        if self.fsdp:
            if self.replica is not None:  # every rank refreshes its own replica
                copy_full_weights(self.policy, self.replica)
                self.sampler.sync_weights(self.adapter.generation_model(self.replica))
                return
            weights = full_state(self.policy)  # on the main process's CPU, gathered one tensor at a time
            # the server gets the model's dtype (FSDP keeps float32 master weights)
            weights = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in weights.items()}
            if self.accelerator.is_main_process:
                self.sampler.sync_weights(model, weights)
            self.accelerator.wait_for_everyone()
            return
        if self.world == 1 or not self.cfg.rollout.server_url:
            self.sampler.sync_weights(model)
            return
        if self.accelerator.is_main_process:
            self.sampler.sync_weights(model)
        self.accelerator.wait_for_everyone()

    def stop_requested(self, stop: StopFlag) -> bool:
        """Ctrl-C on any rank stops every rank at the same point."""
        return self._reduce([float(stop.requested)], "max")[0] > 0


def flat_config(cfg: Config) -> dict:
    """The config as flat `section.key: value` scalars (what TensorBoard's hparams accept)."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        else:
            out[section] = values
    return out


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: bool  # True when Ctrl-C ended the run before train.steps
    main: bool = True  # the main process (the one that prints and writes the run's files)


def train(cfg: Config, resume: bool = False, console=None) -> TrainResult:
    """Run (or resume) training."""
    from rich.console import Console

    from .progress import TrainProgress

    console = console or Console()
    run = Run(cfg, resume=resume)
    main = run.accelerator.is_main_process
    metrics_fh = open(run.run_dir / "metrics.jsonl", "a") if main else None
    samples_fh = open(run.run_dir / "samples.jsonl", "a") if main else None
    last_saved = run.step if run.ckpt is not None else None
    # One-step-off-policy: step n+1's rollouts are sampled (by the server, with the weights of step n-1)
    # while step n trains. The checkpoint records the data position before that prefetch, so a resumed run
    # samples those prompts again rather than skipping them.
    prefetch = ThreadPoolExecutor(max_workers=1) if cfg.rollout.one_step_off_policy else None
    pending: Future | None = None
    try:
        with StopFlag() as stop, TrainProgress(console, cfg.train.steps, run.step, enabled=main and cfg.logging.progress) as bar:
            while run.step < cfg.train.steps and not run.stop_requested(stop):
                t0 = time.perf_counter()
                stale = pending is not None
                got = pending.result() if stale else run.collect(run.step)
                pending = None
                t1 = time.perf_counter()
                if run.stop_requested(stop):  # drop this step's rollouts; the weights are those of the last step
                    break
                data_state = run.stream.state()
                if prefetch is not None and run.step + 1 < cfg.train.steps:
                    pending = prefetch.submit(run.collect, run.step + 1)
                sums = run.update(got.trained, got.rollouts)
                t2 = time.perf_counter()
                if pending is not None:
                    wait([pending])  # its rollouts all come from the old weights: none mixes two policies
                t3 = time.perf_counter()
                run.sync_weights()
                t4 = time.perf_counter()
                run.step += 1
                times = {"rollout": got.seconds, "rollout_wait": t1 - t0, "update": t2 - t1,
                         "prefetch_wait": t3 - t2, "sync": t4 - t3, "step": t4 - t0}
                m = step_metrics(run, *pool(run, step_stats(got), sums), times)
                m["off_policy_steps"] = int(stale)
                if cfg.eval.every and run.step % cfg.eval.every == 0:
                    if main:  # one rank scores the (replicated) policy; the others wait for it
                        m.update(run.evaluate())
                    run.accelerator.wait_for_everyone()
                if main and got.bad_samples:
                    log_bad_samples(run, got.bad_samples, console)
                if cfg.logging.trackers:
                    run.accelerator.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=run.step)
                if main:
                    metrics_fh.write(json.dumps(m) + "\n")
                    metrics_fh.flush()
                    log_samples(run, got, samples_fh)
                    samples_fh.flush()
                bar.advance(m)
                if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps:
                    run.save(data_state)
                    last_saved = run.step
                last_data_state = data_state
        if last_saved != run.step and run.step > 0:
            run.save(last_data_state)
            if stop.requested:
                console.print(f"[yellow]stopped[/] at step {run.step}; checkpoint saved, resume with --resume")
        if main and run.step > 0:
            from .report import write_run_report

            metrics_fh.flush()
            samples_fh.flush()
            write_run_report(run.run_dir)
    finally:
        if cfg.logging.trackers:
            run.accelerator.end_training()
        if prefetch is not None:
            prefetch.shutdown(wait=True, cancel_futures=True)
        for fh in (metrics_fh, samples_fh):
            if fh is not None:
                fh.close()
    return TrainResult(run.run_dir, run.step, stop.requested, main)
