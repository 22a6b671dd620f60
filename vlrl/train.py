"""`vlrl train`: the RL loop, read top to bottom.

Two parts meet at plain records. The rollout layer (`vlrl/rollout/groups.py`) turns prompts into scored
groups: sample a group per prompt -> score rewards -> group advantages (dynamic sampling drops groups with no
signal and refills). The learner (`Run`) takes the rollouts: build the batch -> micro-batched update under
Accelerate (loss normalised once by the step's trained-token count) -> optimizer step. Then the weight-sync
strategy chosen at start sends the weights to the sampler (`vlrl/policy_sync.py`) -> metrics -> checkpoint.
One optimizer step per batch of rollouts, with the ratio taken against the sampler's own logprobs
(algo/losses.py), so no extra "old logprob" pass is needed.

A run is resumable: `--resume` reloads the newest checkpoint (weights, optimizer, scheduler, data position)
and continues on the same data order; sampling is seeded per step, so a resumed run repeats the metrics of
an uninterrupted one. Ctrl-C finishes or drops the current step, saves a checkpoint and exits.

A vLLM server that fails is told apart from one that restarted. Its requests are retried with backoff (a
supervisor may be bringing it back); a server that came back holds the base weights, which its weight version
shows, so the trainer pushes its own and samples the step again (rollouts from weights it did not send are never
trained on). A server that fails for good (retries spent, or any fatal answer of the sampler or the sync) stops
the run as SIGTERM does: a checkpoint of the last completed step, exit code 1, the reason and `--resume`.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, save_config
from .errors import UserError
from .fsdp import full_state, is_fsdp, load_optimizer_state, optimizer_state
from .metrics import (
    forget_steps_after,
    log_bad_samples,
    log_reward_errors,
    log_samples,
    pool,
    step_metrics,
    step_stats,
)
from .planner import micro_batch_tokens, plan_step
from .records import Rollout
from .rollout.vllm_client import ServerError, ServerRestarted
from .update import accumulate_gradients


class StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next safe point (the step's rollouts
    dropped, or its update finished), save a checkpoint and exit; a second one to the same process interrupts at
    once (a stop agreed on with other ranks, or a failure, counts no signal: under torchrun a rank's own SIGTERM
    may come after it agreed to stop on another rank's). The handlers stay in place through the final save.

    SIGTERM is what Slurm, Kubernetes and most schedulers send on preemption or time-out, then SIGKILL after a
    grace period (Slurm's KillWait, 30 s by default; Kubernetes' terminationGracePeriodSeconds, 30 s): the
    grace must cover what is left of one step plus a checkpoint write (`--signal=TERM@120` or a longer grace
    for large models). Under `accelerate launch` / torchrun every rank gets the signal, and the ranks agree on
    stopping through `Run.stop_requested`. `code` is the exit code the command ends with: 130 for SIGINT,
    143 for SIGTERM (128 + the signal's number), as shells report them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.code = 0
        self.reason: str | None = None  # why the run stopped on its own (a failed server)
        self.received = 0  # signals this process had (a stop agreed on with other ranks, or a failure, is none)
        self._previous: dict = {}

    def fail(self, reason: str) -> None:
        """Stop at the next safe point with exit code 1, as on a signal: the sampler or the sync failed for good."""
        self.requested, self.code, self.reason = True, self.code or 1, reason

    def __enter__(self):
        def handler(signum, frame):
            self.received += 1
            if self.received > 1:
                raise KeyboardInterrupt
            self.requested = True
            self.code = 128 + signum

        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Run:
    """The learner: policy, optimizer, scheduler, reference model, and the state a checkpoint holds. Its verbs:
    `update` (one optimizer step on plain rollouts) and `save`; a resume happens at construction. It knows
    nothing of samplers, prompts or rewards: the rollout layer (`vlrl/rollout/groups.py`) feeds it."""

    def __init__(self, cfg: Config, resume: bool = False):
        from accelerate import Accelerator
        from transformers import get_scheduler

        from .adapters import load_adapter
        from .checkpoint import latest_checkpoint, load_trainer_state
        from .runtime import quiet_libraries, resolve_dtype

        quiet_libraries()
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt = latest_checkpoint(self.run_dir) if resume else None
        # --resume of a run stopped before its first checkpoint starts it over at step 0 (train drops its logs)
        self.restarted = resume and self.ckpt is None and (self.run_dir / "metrics.jsonl").exists()
        if resume and self.ckpt is None and not self.restarted:
            raise UserError(f"--resume: no run to resume in {self.run_dir} (no checkpoint, no metrics.jsonl); "
                            "start without --resume")
        if not resume and (self.run_dir / "metrics.jsonl").exists():
            what = ("it stopped before its first checkpoint; pass --resume to start it over at step 0 (its logged "
                    "steps are dropped)" if latest_checkpoint(self.run_dir) is None else "pass --resume to continue it")
            raise UserError(f"run directory {self.run_dir} already holds a run; {what}, or choose another name "
                            "(--set name=...)")
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
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        torch.manual_seed(cfg.train.seed)

        self.adapter = load_adapter(cfg.model)
        if self.fsdp:  # the family's units, whatever classes the launch config names (fsdp2-*.yaml: the dense)
            self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = list(self.adapter.fsdp_units)
        self.dtype = dtype = resolve_dtype(cfg, self.device)
        self.model = self.adapter.load_model(dtype, self.device, weights_from=self._weights_dir())
        self.adapter.prepare_for_training(self.model, cfg, adapter_dir=self.ckpt)
        self.policy = self.adapter.policy(self.model, cfg.rollout.temperature, fused_head=cfg.train.compile)
        self.auto_checkpointing = None
        if cfg.train.checkpoint_fraction == "auto":  # (the config allows it only with gradient checkpointing)
            from .activation_memory import AutoCheckpointing, Head

            weight = self.model.get_output_embeddings().weight  # [V, H]
            head = Head(lambda keep: setattr(self.accelerator.unwrap_model(self.policy), "keep_logits", keep),
                        weight.shape[0] * weight.element_size(),
                        weight.numel() / self.adapter.layer_parameters(self.model))
            self.auto_checkpointing = AutoCheckpointing(
                lambda f, s: self.adapter.set_checkpointing(self.model, f, s),
                self.adapter.decoder_layers(self.model), self.device, head)
        self.messages: list[str] = []  # said once, by the main process (train prints them)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.train.learning_rate, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay,
            fused=on_gpu,
        )
        schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.lr_schedule]
        self.scheduler = get_scheduler(schedule, self.optimizer, cfg.train.warmup_steps, cfg.train.steps)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, self.optimizer, self.scheduler)
        self.offload = self._offload(params, on_gpu)
        self.train_budgets = cfg.train  # its micro-batch budgets as in use (`auto` may halve micro_batch_tokens)
        self.ref_policy = None
        if cfg.algorithm.kl_coef > 0:
            ref = self.adapter.load_model(dtype, self.device).eval().requires_grad_(False)
            self.ref_policy = self.adapter.policy(ref, cfg.rollout.temperature)
        # Under FSDP no rank holds the whole policy: the in-process sampler gets an unsharded replica per rank,
        # refreshed after every step (policy_sync.ReplicaRefresh), so ranks sample independently.
        self.replica = None
        if self.fsdp and not cfg.rollout.server_url:
            self.replica = self.adapter.load_model(dtype, self.device, weights_from=self._weights_dir())
            self.replica.eval().requires_grad_(False)

        self.step = 0
        self.data_state = {"index": 0}  # this rank's position in the prompt stream
        if self.ckpt is not None:
            state = load_trainer_state(self.ckpt)
            load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
            if self.offload is not None:
                self.offload.offload_now()
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            ranks = state["data"]
            if len(ranks) != self.world:
                raise UserError(f"{self.ckpt} was written by {len(ranks)} process(es); resume it with as many "
                                f"(this run has {self.world})")
            self.data_state = ranks[self.rank]
            torch.set_rng_state(state["torch_rng"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.toml")
        if trackers:
            self.accelerator.init_trackers(cfg.logging.project, config=flat_config(cfg),
                                           init_kwargs={"wandb": {"name": cfg.name, "dir": str(self.run_dir)}})

    def _offload(self, params, on_gpu: bool):
        """`train.offload_optimizer`: the StateOffload of this run, or None."""
        setting = self.cfg.train.offload_optimizer
        auto = setting == "auto"
        if auto:
            setting = on_gpu and self.cfg.train.checkpoint_fraction == "auto" and not self.fsdp
        elif setting and self.fsdp:
            raise UserError("train.offload_optimizer = true is for one process or DDP: under FSDP2 each rank holds "
                            "a shard of the optimizer's state already (set it to false or \"auto\")")
        if not setting:
            return None
        from .activation_memory import gradient_bytes
        from .optimizer_offload import StateOffload

        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # (Accelerate's wrapper)
        offload = StateOffload(inner, params, gradient_bytes(params), self.device)
        self.messages.append(offload.describe() + (' (offload_optimizer = "auto": kept if the first update finds '
                                                   "it lets checkpointing recompute less)" if auto else ""))
        return offload

    def _weights_dir(self) -> str | None:
        """Full-parameter runs resume from the checkpoint's weights; LoRA runs from the base + adapter."""
        if self.ckpt is None or self.cfg.model.lora_rank > 0:
            return None
        return str(self.ckpt)

    @property
    def sampling_model(self):
        """The HF model an in-process sampler generates with: the policy's own, or (FSDP) the replica."""
        return self.replica if self.replica is not None else self.accelerator.unwrap_model(self.policy).model

    def over_ranks(self, values: list[float], op: str) -> list[float]:
        """`values` reduced over the ranks by `op` ("sum", "max", "min"); as they are on one process."""
        if self.world == 1:
            return values
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.device), op).tolist()

    def update(self, trained: list[Rollout], fallback: list[Rollout]) -> dict[str, float]:
        """One optimizer step on this rank's `trained` rollouts. With several ranks, the loss is normalised by
        the counts of all ranks, and every rank runs as many forward/backward passes as the busiest one (a
        rank with nothing to train runs zero-weight passes over `fallback`), so collectives stay in step."""
        if self.world == 1 and not trained:
            return {}
        batch, plan = self._plan(trained, fallback)
        if plan.total_tokens == 0:
            return {}
        self.policy.train()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        auto = self.auto_checkpointing
        if auto is not None and auto.level is None:  # "auto": measured on this step's largest micro-batch
            batch, plan = self._decide(auto, trained, fallback, params)
        while True:
            try:
                sums = self._passes(batch, plan)
                break
            except torch.OutOfMemoryError:
                if not self.recovered_from_oom():
                    raise
        return self.optimizer_step(params, sums, len(plan.micro_batches))

    def _plan(self, trained: list[Rollout], fallback: list[Rollout]):
        """The step's batch and plan within `self.train_budgets` (the micro-batch budgets in use)."""
        batch, plan = plan_step(trained, fallback or [self.adapter.empty_rollout()], self.adapter.build_batch,
                                self.train_budgets, self.adapter.packing_unavailable(self.model), self.world,
                                self.over_ranks)
        if self.offload is not None:  # the longest micro-batch last: its backward hides the moments' copies to the GPU
            computed = micro_batch_tokens(batch.lengths, plan.micro_batches, plan.packed)
            plan.micro_batches.append(plan.micro_batches.pop(computed.index(max(computed))))
        return batch, plan

    def _passes(self, batch, plan, fetch: bool = True) -> dict[str, float]:
        """The forward/backward passes of `plan`; `fetch`: the offloaded moments come back in the last backward."""
        cfg, offload = self.cfg, self.offload
        return accumulate_gradients(self.policy, batch, plan, cfg.algorithm, cfg.rollout.max_new_tokens, self.device,
                                    self.ref_policy, self.accelerator, loss_scale=self.world,
                                    before_backward=offload.before_backward if offload is not None and fetch else None)

    def _decide(self, auto, trained: list[Rollout], fallback: list[Rollout], params):
        """`checkpoint_fraction = "auto"` at the first update: the level, the head's logits, the optimizer offload
        (`offload_optimizer = "auto"`) and the token budget (activation_memory.py), each said once. Returns the
        step's batch and plan within the budget chosen."""
        cfg, offload = self.cfg, self.offload
        planned = {}

        def decide_at(budget):
            self.train_budgets = cfg.train.model_copy(update={"micro_batch_tokens": budget})
            batch, plan = planned[budget] = planned.get(budget) or self._plan(trained, fallback)
            computed = micro_batch_tokens(batch.lengths, plan.micro_batches, plan.packed)
            biggest = plan.micro_batches[computed.index(max(computed))]
            # the longest micro-batch a later step can have: the token budget, else (several ranks, which cannot
            # recover from an OOM together) the most a micro-batch of max_model_len samples computes
            cap = budget or (cfg.train.micro_batch_size * cfg.model.max_model_len if self.world > 1 else None)
            plain_probe = None
            if offload is not None and cfg.train.offload_optimizer == "auto":  # measured both ways, kept if it pays
                def plain_probe():
                    return self._probe(lambda p: self._passes(batch, p, fetch=False), plan, biggest)
            return auto.decide(lambda: self._probe(lambda p: self._passes(batch, p), plan, biggest), params,
                               bool(self.optimizer.state), self.over_ranks, distributed=self.world > 1,
                               probe_tokens=max(computed), token_cap=cap, accumulates=len(plan.passes) > 1,
                               probe_trained=int(batch.loss_mask[biggest].sum()),
                               offloaded=offload.bytes if offload is not None else 0,
                               probe_without_offload=plain_probe)

        budget, said = auto.decide_budget(decide_at, cfg.train.micro_batch_tokens, cfg.model.max_model_len)
        self.train_budgets = cfg.train.model_copy(update={"micro_batch_tokens": budget})
        self.messages.append(said)
        if offload is not None and auto.offload_declined:
            offload.restore()
            self.offload = None
            self.messages.append('optimizer state: on the device (offload_optimizer = "auto": the host copies '
                                 "would not spare a layer recomputed whole)")
        return planned[budget]

    def recovered_from_oom(self) -> bool:
        """A pass ran out of memory: the step's gradients dropped (a backward that died midway summed some and
        not others) and, on one process, auto checkpointing stepped up. True: redo the step's passes."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.offload is not None:
            self.offload.drop()
        auto = self.auto_checkpointing
        note = auto.step_up() if auto is not None and self.world == 1 else None
        if note is None:  # (with several ranks, the others wait in a collective: no recovery)
            return False
        torch.cuda.empty_cache()
        if note:
            self.messages.append(note)
        return True

    def optimizer_step(self, params, sums: dict[str, float], micro_batches: int) -> dict[str, float]:
        """The step once its gradients are accumulated: clipped, AdamW, the schedule; `sums` gets what it logs."""
        grad_norm = self.accelerator.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        offload = self.offload
        if offload is not None:
            offload.before_step()
        self.optimizer.step()
        if offload is not None:
            offload.after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(grad_norm)
        sums["micro_batches"] = micro_batches
        auto = self.auto_checkpointing
        if auto is not None:
            sums["checkpoint_fraction"] = auto.fraction
            sums["selective_fraction"] = auto.selective
        if self.device.type == "cuda":
            sums["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return sums

    def why_not_streamed(self) -> str | None:
        """Why this step's update cannot begin before its last group is in (None: it can; see
        `streamed_update.py`)."""
        cfg = self.cfg
        if not cfg.train.streamed_update:
            return "train.streamed_update = false"
        if self.fsdp:
            return "FSDP2 reduce-scatters every pass: ranks run as many passes, planned over the whole step"
        if self.offload is not None:
            return "train.offload_optimizer fetches the moments in the step's last (longest) micro-batch"
        if self.auto_checkpointing is not None and self.auto_checkpointing.level is None:
            return "auto checkpointing decides on the first step's largest micro-batch"
        if cfg.algorithm.router_aux_loss_coef > 0 and cfg.algorithm.aggregation != "token-mean":
            return "the router's loss is normalised by tokens and the policy loss by sequences"
        return None

    def _probe(self, run, plan, biggest: list[int]) -> None:
        """The step's largest micro-batch, forward and backward, then its gradients dropped: what `auto`
        checkpointing measures (every rank runs exactly one pass, so collectives match)."""
        from dataclasses import replace

        try:
            run(replace(plan, micro_batches=[biggest], padding_passes=0))
        finally:  # (also after an out-of-memory error: the chooser probes other levels after one)
            self.optimizer.zero_grad(set_to_none=True)
            if self.offload is not None:  # the moments the probe's last pass fetched (or would have)
                self.offload.drop()

    def save(self, data_state: dict) -> Path | None:
        """Checkpoint the learner with `data_state` (this rank's prompt-stream position; every rank's is gathered
        into it). The main process writes, the others wait."""
        from .checkpoint import save_checkpoint

        data = [data_state]
        if self.world > 1:
            from accelerate.utils import gather_object

            data = gather_object(data)
        if self.offload is not None:  # the last step's moments on the host before they are read
            self.offload.settle()
        state = {
            "step": self.step,
            "optimizer": optimizer_state(self.policy, self.optimizer),  # by parameter name; gathered under FSDP
            "scheduler": self.scheduler.state_dict(),
            "data": data,
            "torch_rng": torch.get_rng_state(),
        }
        weights = full_state(self.policy) if self.fsdp else None  # every rank takes part in the gather
        path = None
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.policy).model
            path = save_checkpoint(self.run_dir, self.step, lambda d: self.adapter.save_pretrained(model, d, weights),
                                   state, self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def agree(self, value: int) -> int:
        """The largest of the ranks' `value`s (every rank calls it at the same point)."""
        return int(self.over_ranks([float(value)], "max")[0])

    def stop_requested(self, stop: StopFlag) -> bool:
        """Ctrl-C or SIGTERM on any rank stops every rank at the same point, with the same exit code. The answer
        is the agreed one, never the local flag: a signal handled while this rank waited in the reduction (its
        handler runs as the reduction returns) would otherwise stop this rank and not the others, which then
        wait for it in the next step's collectives. Such a signal is agreed on at the next call."""
        code = int(self.over_ranks([float(stop.code)], "max")[0])
        if code:
            stop.requested, stop.code = True, code
        return bool(code)


def untrained_reason(kept: int, m: dict) -> str:
    """Why a step that kept `kept` rollouts, with metrics `m`, trained nothing, in words."""
    if kept == 0 and m["groups_dropped"]:
        why = (f"every group's rewards agreed ({m['groups_dropped']} groups dropped over {m['sampling_rounds']} "
               f"sampling rounds, mean reward {m['reward/mean']:.3f})")
    elif kept == 0:
        why = "no sample could be used"
    else:
        why = f"none of the {kept} kept rollouts could be trained (failed rewards, or overlong masking)"
    extra = [f"{m['reward_failures']} reward failures"] if m["reward_failures"] else []
    extra += [f"{m['bad_samples']} bad samples"] if m["bad_samples"] else []
    return why + (f" ({', '.join(extra)})" if extra else "")


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
    stopped: bool  # True when Ctrl-C or SIGTERM ended the run before train.steps
    main: bool = True  # the main process (the one that prints and writes the run's files)
    exit_code: int = 0  # 130 after Ctrl-C, 143 after SIGTERM, 1 after a server failure
    reason: str | None = None  # why a run stopped on its own (the server's failure)


RESAMPLES = 5  # a step sampled again after this many server restarts in a row stops the run


def agreed_attempt(fetch, run: Run):
    """`fetch()` (sampling, or taking from the producer) and what became of it, agreed by every rank: (status,
    error, result) with status 0 when it gave rollouts, 1 when the vLLM server restarted meanwhile (on any
    rank), 2 when a server failed for good."""
    status, error, got = 0, None, None
    try:
        got = fetch()
    except ServerRestarted as e:
        status, error = 1, str(e)
    except ServerError as e:
        status, error = 2, str(e)
    return run.agree(status), error, got


def sample_step(rollouts, stream, step: int, prompts: int, run: Run, sync, stop: StopFlag):
    """This step's groups, every one sampled by a server holding the trainer's weights. A server that restarted
    meanwhile (on any rank: the ranks agree) gets the weights again and the step's prompts are sampled again; a
    server that failed for good calls `stop.fail` and gives None."""
    start = stream.state()
    for _ in range(RESAMPLES):
        status, error, got = agreed_attempt(lambda: rollouts.step(stream, step, prompts), run)
        if status == 2:
            stop.fail(error or "a vLLM request of another rank failed")
            return None
        if status == 0:
            return got
        stream.restore(start)  # the same prompts, from the weights the trainer sends now
        run.messages.append(f"step {step + 1}: the vLLM server restarted ({error or 'on another rank'}); the "
                            "trainer's weights pushed again and the step's prompts sampled again")
        if not pushed_again(run, sync, stop, step):
            return None
    stop.fail(f"the vLLM server restarted {RESAMPLES} times while one step was sampled")
    return None


def take_async(producer, step: int, run: Run, sync, stop: StopFlag, streamed=None):
    """Asynchronous rollouts (`rollout.max_off_policy_steps`): step `step`'s groups from the producer, each
    fed to `streamed` (a StreamedUpdate) as it is taken, if given. A server that restarted meanwhile (on any
    rank: the ranks agree) costs the groups generated ahead: dropped, the trainer's weights pushed again,
    production restarted at this step (and the streamed step's passes forgotten). A server that failed for
    good calls `stop.fail` and gives None (as does a stop requested while waiting)."""
    each = (lambda groups: streamed.add(groups.trained)) if streamed is not None else None
    for _ in range(RESAMPLES):
        status, error, got = agreed_attempt(lambda: producer.take(step, stop, each), run)
        if status == 0 and got is not None:
            return got
        if streamed is not None:
            streamed.discard()
        if status == 2:
            stop.fail(error or "a vLLM request of another rank failed")
            return None
        if status == 0:
            return got
        before = producer.resume_state()  # (the failed group's own position included)
        dropped = producer.close()
        producer.stream.restore(before)
        run.messages.append(f"step {step + 1}: the vLLM server restarted ({error or 'on another rank'}); "
                            f"{dropped} group(s) generated ahead dropped, the trainer's weights pushed again and "
                            "production restarted at this step")
        if not pushed_again(run, sync, stop, step):
            return None
        producer.start(step)
    stop.fail(f"the vLLM server restarted {RESAMPLES} times while one step was sampled")
    return None


def pushed_again(run: Run, sync, stop: StopFlag, version: int) -> bool:
    """The trainer's weights (of `version`) pushed to a server that restarted; False (and `stop.fail`) when the
    push failed."""
    try:
        sync(run.policy, version=version)
    except ServerError as e:
        stop.fail(str(e))
        return False
    return True


def train(cfg: Config, resume: bool = False, console=None) -> TrainResult:
    """Run (or resume) training."""
    from rich.console import Console

    from .data.sources import load_samples
    from .data.stream import PromptStream
    from .policy_sync import choose_sync
    from .progress import train_bar, train_fields
    from .rollout import make_sampler
    from .rollout.groups import RolloutGroups

    console = console or Console()
    run = Run(cfg, resume=resume)
    main = run.accelerator.is_main_process
    sampler = make_sampler(cfg, run.sampling_model, run.adapter, rank=run.rank)
    sync = choose_sync(bool(cfg.rollout.server_url), run.fsdp, sampler, run.accelerator, run.replica, run.dtype)
    # a server may hold other weights (another run, an older step): start from the trainer's
    sync(run.policy, version=run.step)
    rollouts = RolloutGroups(cfg, run.adapter, sampler, run.rank, run.world)
    position = dict(run.data_state)
    ahead = position.pop("ahead", 0)  # groups an asynchronous run had generated ahead when it was saved
    stream = PromptStream(load_samples(cfg.env, "train", cfg.train.seed), cfg.train.seed, run.rank, run.world,
                          **position)
    local_prompts = len(range(run.rank, cfg.rollout.prompts_per_step, run.world))  # prompts r, r + world, ...
    evaluator = TrainingEval(cfg, rollouts) if cfg.eval.every else None
    if main and resume:
        forget_steps_after(run.run_dir, run.step)
        if ahead:
            console.print(f"--resume: the {ahead} group(s) of rollouts generated ahead at step {run.step} were not "
                          "saved; their prompts are sampled again", highlight=False, markup=False)
        if run.restarted:
            console.print(f"--resume: {run.run_dir} holds no checkpoint (the run stopped before its first); starting "
                          "over at step 0, its logged steps dropped", highlight=False, markup=False)
    metrics_fh = open(run.run_dir / "metrics.jsonl", "a") if main else None
    samples_fh = open(run.run_dir / "samples.jsonl", "a") if main else None
    last_saved = run.step if run.ckpt is not None else None
    last_data_state = stream.state()
    shown_errors = 0  # reward-failure messages printed so far
    idle = 0  # steps in a row that trained nothing
    # Asynchronous rollouts (rollout.max_off_policy_steps = k > 0): a producer generates the next k steps'
    # groups while a step trains (rollout/producer.py). A checkpoint records the data position of the oldest
    # group not yet trained, so a resumed run samples those prompts again rather than skipping them.
    k = cfg.rollout.max_off_policy_steps
    producer = None
    if k:
        from .rollout.producer import RolloutProducer
        from .streamed_update import StreamedUpdate

        producer = RolloutProducer(rollouts, stream, local_prompts, k, run.step, cfg.train.steps)
    streamed = None  # a step's update begun as its groups arrive (asynchronous rollouts: streamed_update.py)
    try:
        with StopFlag() as stop, train_bar(console, cfg.train.steps, run.step, main and cfg.logging.progress) as bar:
            while run.step < cfg.train.steps and not run.stop_requested(stop):
                t0 = time.perf_counter()
                if producer is not None:
                    if run.why_not_streamed() is None:
                        streamed = StreamedUpdate(run)
                    got = take_async(producer, run.step, run, sync, stop, streamed)
                else:
                    got = sample_step(rollouts, stream, run.step, local_prompts, run, sync, stop)
                t1 = time.perf_counter()
                if run.stop_requested(stop):  # drop this step's rollouts; the weights are those of the last step
                    if streamed is not None:
                        streamed.discard()
                    break
                data_state = stream.state()
                if producer is not None:  # the oldest group not trained yet, and how many are ahead
                    data_state = {**producer.resume_state(), "ahead": producer.pending()}
                overlapped = 0.0  # seconds of the update run while the step's groups came in
                if streamed is not None:
                    overlapped = streamed.seconds
                    sums = streamed.finish()
                    streamed = None
                else:
                    sums = run.update(got.trained, got.rollouts)
                t2 = time.perf_counter()
                for message in run.messages:
                    if main:
                        console.print(message, highlight=False, markup=False)
                run.messages.clear()
                t3 = time.perf_counter()
                try:
                    sync(run.policy, version=run.step + 1)
                except ServerError as e:  # the step is trained: it is logged and saved, then the run stops
                    stop.fail(str(e))
                if producer is not None:
                    producer.publish(run.step + 1)  # the producer may start groups of the step k ahead
                t4 = time.perf_counter()
                times = {"rollout": got.seconds, "rollout_wait": t1 - t0 - overlapped, "update": t2 - t1 + overlapped,
                         "update_overlapped": overlapped,
                         **sync.times(t4 - t3), "step": t4 - t0}
                stats, sums = pool(step_stats(got, run.step if k else None), sums, run.world)
                run.step += 1
                m = step_metrics(run.step, stats, sums, times, run.scheduler.get_last_lr()[0], rollouts.keys[0],
                                 cfg.algorithm.kl_coef > 0, multi_turn=rollouts.env is not None)
                idle = idle + 1 if stats["trained"] == 0 else 0
                if idle and main:
                    console.print(f"step {run.step}: no update, {untrained_reason(stats['kept'], m)}", highlight=False, markup=False)
                if evaluator is not None and run.step % cfg.eval.every == 0:
                    if main:  # one rank scores the (replicated) policy; the others wait for it
                        try:
                            m.update(evaluator(run.step, run.run_dir))
                        except ServerError as e:  # the step is trained: saved, then the run stops
                            stop.fail(f"evaluation at step {run.step}: {e}")
                    run.accelerator.wait_for_everyone()
                if main and got.errors:
                    shown_errors = log_reward_errors(run.run_dir / "reward_errors.jsonl", run.step, got.errors,
                                                     console, shown_errors)
                if main and got.bad_samples:
                    log_bad_samples(run.run_dir / "bad_samples.jsonl", run.step, got.bad_samples, got.new_bad_samples,
                                    console)
                if cfg.logging.trackers:
                    run.accelerator.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=run.step)
                if main:
                    metrics_fh.write(json.dumps(m) + "\n")
                    metrics_fh.flush()
                    log_samples(samples_fh, run.step, got.rollouts, cfg.logging.samples_per_step,
                                run.run_dir / "images", run.run_dir)
                    samples_fh.flush()
                bar.update(run.step, **train_fields(m))
                if idle >= cfg.train.max_steps_without_update:
                    raise UserError(
                        f"stopped at step {run.step}: {idle} steps in a row trained nothing (the last: "
                        f"{untrained_reason(stats['kept'], m)}). Check that env.rewards can score completions differently; or "
                        "raise algorithm.max_refill_rounds, turn algorithm.dynamic_sampling off, or raise "
                        "train.max_steps_without_update")
                if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps:
                    run.save(data_state)
                    last_saved = run.step
                last_data_state = data_state
            # Still under the signal handlers: torchrun passes SIGTERM to one rank after the other, so a rank may
            # get its own after the ranks agreed to stop on another's, here; by default it would die mid-save.
            if last_saved != run.step and run.step > 0:
                run.save(last_data_state)
                if stop.requested and main and stop.reason is None:
                    console.print(f"[yellow]stopped[/] at step {run.step}; checkpoint saved, resume with --resume")
            if stop.reason is not None and main:
                saved = f"the checkpoint of step {run.step} is saved" if run.step > 0 else "nothing was trained yet"
                console.print(f"[red]stopped at step {run.step}[/]: {stop.reason}. {saved}; once the server is "
                              "back, continue with `vlrl train CONFIG --resume`", highlight=False)
            if main and run.step > 0:
                from .report import write_run_report

                metrics_fh.flush()
                samples_fh.flush()
                write_run_report(run.run_dir)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, but say what is on disk
        if main:
            saved = (f"the newest checkpoint is {run.run_dir / f'step-{last_saved}'}: --resume continues from step "
                     f"{last_saved} (the steps logged after it are logged again)" if last_saved
                     else "no checkpoint was saved: --resume starts the run over at step 0 (its logged steps dropped)")
            console.print(f"interrupted again: stopped at once, in step {run.step + 1}, without saving it; {saved}",
                          highlight=False, markup=False)
        raise
    finally:
        note = sync.close()  # the last weight push finished (in the background), the sync's buffers freed
        if note and main:
            console.print(note, highlight=False, markup=False)
        if producer is not None:  # batches generated ahead finish (their requests are not aborted), then dropped
            producer.close()
        rollouts.close()
        if cfg.logging.trackers:
            run.accelerator.end_training()
        for fh in (metrics_fh, samples_fh):
            if fh is not None:
                fh.close()
    return TrainResult(run.run_dir, run.step, stop.requested, main, stop.code, stop.reason)


class TrainingEval:
    """`eval.every`: the live policy scored on the eval split (its first `eval.limit` samples) with the
    training run's own sampler and rewards, into `<run dir>/eval-step-N/`; returns `eval/...` metrics."""

    def __init__(self, cfg: Config, rollouts):
        from .data.sources import load_samples

        samples = load_samples(cfg.env, "eval", cfg.train.seed)
        self.cfg, self.rollouts = cfg, rollouts
        self.samples = samples[: cfg.eval.limit] if cfg.eval.limit else samples

    def __call__(self, step: int, run_dir: Path) -> dict:
        from .evaluate import evaluate

        cfg = self.cfg
        summary = evaluate(cfg, self.rollouts, self.samples, cfg.eval.n or cfg.rollout.group_size, cfg.rollout.seed,
                           run_dir / f"eval-step-{step}", info={"step": step, "split": "eval"})
        return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "seed"}
