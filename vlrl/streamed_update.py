"""A step's update that begins before its last group is in (asynchronous rollouts).

With `rollout.max_off_policy_steps = k` the producer hands the learner a step's groups one at a time, as they
finish (rollout/producer.py). A step used to wait for its last group, then run all its micro-batches; the
waiting is what kept the learner idle at k = 2 (a group's latency is its longest completion's). Here each
group goes into the step's update as it arrives: once the pending rollouts fill more than one micro-batch
(the planner's own packing, `planner.micro_batches`), every micro-batch but the last opened is run, forward
and backward, its gradients accumulated, while the producer's threads keep sampling. After the last group,
what is left is run and the optimizer steps. The same weights compute every pass (nothing changes until the
optimizer step), so a group's staleness is what it would be in a step that waited.

Exactness: the loss of a step is normalised by its trained tokens (or sequences), unknown until its last
group. The passes run unnormalised (`total_tokens = total_sequences = 1`) and the summed gradients are
scaled once by 1 / the step's count before clipping: the same gradient as one update over the step, to
rounding (tests/test_streamed_update.py).

Several processes (DDP): each rank streams its own groups. The passes before its last run outside DDP's
wrapper (no gradient reduced, no buffer broadcast: ranks run different numbers of passes); its last pass, a
zero-weight one if it had no group, goes through the wrapper and reduces the gradients accumulated, and the
counts that scale them are summed over ranks. Rollouts are not balanced across ranks by tokens first
(`planner.exchange_rollouts` needs every rank's step): a rank whose groups ran long is the one the others
wait for, at the step's end.

Where it does not apply, `Run.why_not_streamed` says why and the step waits for all its groups as before:
FSDP2 (it reduce-scatters every pass, so ranks must run as many), `train.offload_optimizer` (its fetch rides
the step's last, longest micro-batch), auto checkpointing's first step (it measures the step's largest
micro-batch), a router loss with a loss normalised by sequences.

On one process, a pass that runs out of memory redoes the step's passes so far after auto checkpointing steps
up (their batches are kept until the step ends), as `Run.update` does.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .planner import StepPlan, plan_step
from .records import Rollout
from .update import accumulate_gradients, merge_sums


class StreamedUpdate:
    """One optimizer step of `run` (a `train.Run`) fed group by group: `add` each group's trained rollouts,
    then `finish`; `discard` forgets a step that will be sampled again (a restarted server)."""

    def __init__(self, run):
        self.run = run
        self.pending: list[Rollout] = []
        self.ran: list[tuple] = []  # (batch, packed, micro-batches, sync) run: what an OOM makes us redo
        self.sums: dict[str, float] = {}
        self.tokens = self.sequences = 0.0  # the step's trained tokens and sequences so far
        self.micro_batches = 0
        self.seconds = 0.0  # spent computing (the learner's busy time inside the producer's take)

    # --- fed by the producer --------------------------------------------------------------------------------
    def add(self, rollouts: list[Rollout]) -> None:
        """A finished group's trained rollouts: run every micro-batch they fill but the last."""
        if not rollouts:
            return
        t0 = time.perf_counter()
        self.pending += rollouts
        budget = self.run.train_budgets.micro_batch_tokens
        if budget is None or sum(r.length for r in self.pending) > budget:
            batch, plan = self._plan(self.pending)
            if len(plan.micro_batches) > 1:
                full, last = plan.micro_batches[:-1], plan.micro_batches[-1]
                self._run(batch, plan.packed, full)
                self.pending = [self.pending[i] for i in last]
        self.seconds += time.perf_counter() - t0

    def discard(self) -> None:
        """Forget the step: gradients and rollouts (their groups are sampled again)."""
        self.run.optimizer.zero_grad(set_to_none=True)
        self.__init__(self.run)

    def finish(self) -> dict[str, float]:
        """Run what is pending, scale the gradients by the step's counts, step the optimizer. The step's
        logged sums (as `Run.update` returns them; {} when nothing was trained)."""
        t0 = time.perf_counter()
        run = self.run
        if self.pending:
            batch, plan = self._plan(self.pending)
            self._run(batch, plan.packed, plan.micro_batches, sync=True)
            self.pending = []
        elif run.world > 1:  # (this rank had no group) a pass of zero weight, through DDP's wrapper: the
            self._begin()    # reduction of the other ranks' gradients needs this rank's part, zeros
            # (a token in the loss, so the pass has a graph to go back through; its weight is 0)
            batch = run.adapter.build_batch([replace(run.adapter.empty_rollout(), completion_mask=[1])])
            accumulate_gradients(run.policy, batch, StepPlan([[0]], packed=False, total_tokens=1.0,
                                                             total_sequences=1.0),
                                 run.cfg.algorithm, run.cfg.rollout.max_new_tokens, run.device,
                                 run.ref_policy, run.accelerator, loss_scale=0.0)
        tokens, sequences = run.over_ranks([self.tokens, self.sequences], "sum")  # (all ranks')
        if tokens == 0:
            self.discard()
            return {}
        settings = run.cfg.algorithm
        per = tokens if settings.aggregation == "token-mean" else sequences
        scale = 1.0 / max(per, 1.0)
        params = [p for p in run.policy.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        sums = dict(self.sums)
        if "loss" in sums:  # (a rank with no group logs none)
            sums["loss"] *= scale
        if "router_aux_loss" in sums:  # (normalised by tokens: only streamed with token-mean, see above)
            sums["router_aux_loss"] /= max(tokens, 1.0)
        out = run.optimizer_step(params, sums, self.micro_batches)
        self.seconds += time.perf_counter() - t0
        return out

    # --- passes ---------------------------------------------------------------------------------------------
    def _plan(self, rollouts: list[Rollout]):
        run = self.run
        return plan_step(rollouts, [], run.adapter.build_batch, run.train_budgets,
                         run.adapter.packing_unavailable(run.model))

    def _run(self, batch, packed: bool, micro_batches: list[list[int]], sync: bool = False) -> None:
        """Forward/backward of `micro_batches` of `batch`, unnormalised; `sync`: the step's last passes (DDP
        reduces the gradients after them). An OOM (one process) redoes the step's passes."""
        if not self.ran:
            self._begin()
        self.ran.append((batch, packed, micro_batches, sync))
        todo = self.ran[-1:]
        while True:
            try:
                for passes in todo:
                    self._passes(*passes)
                return
            except torch.OutOfMemoryError:  # (again during the redo: redone again, one level up)
                if not self.run.recovered_from_oom():
                    raise
                self.sums, self.tokens, self.sequences, self.micro_batches = {}, 0.0, 0.0, 0
                todo = list(self.ran)

    def _begin(self) -> None:
        run = self.run
        run.policy.train()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)

    def _passes(self, batch, packed: bool, micro_batches: list[list[int]], sync: bool) -> None:
        run, cfg = self.run, self.run.cfg
        plan = StepPlan(micro_batches, packed, total_tokens=1.0, total_sequences=1.0)
        # Passes before the last go to the module inside DDP's wrapper: DDP broadcasts buffers in every
        # forward (a collective, and ranks here run different numbers of passes) and would reduce the
        # gradients after each pass's last backward. They accumulate in the same parameters, and the step's
        # last pass, through the wrapper, reduces them all (as under no_sync).
        policy = run.policy if sync else run.accelerator.unwrap_model(run.policy)
        sums = accumulate_gradients(policy, batch, plan, cfg.algorithm, cfg.rollout.max_new_tokens,
                                    run.device, run.ref_policy, run.accelerator, loss_scale=run.world)
        rows = batch.loss_mask[[i for g in micro_batches for i in g]]
        self.tokens += float(rows.sum())
        self.sequences += float((rows.sum(-1) > 0).sum())
        self.micro_batches += len(micro_batches)
        self.sums = merge_sums(self.sums, sums)
