"""`train.checkpoint_fraction = "auto"`: the least recomputation whose peak fits the memory the run really has.

Each decoder layer keeps its activations (`none`), keeps its matrix products and recomputes the elementwise ops
(`selective`), or recomputes its whole forward (`full`) in the backward pass (`adapters/checkpointing.py`).
From fastest to leanest they form a ladder of 2L + 1 levels for L layers: level i <= L has i selective layers
and L - i keeping everything; level L + j has j full layers and L - j selective. (Selective comes first: it
frees 45% of a layer's activations for ~0.4 of what full costs; full frees the rest.) The chooser takes the lowest level that fits, which is the fastest. Measured on one
H200 (8B, 16k-token packed micro-batches, compiled layers): a layer keeping everything holds 2.16 GiB, a selective
one 1.19, a full one its input (0.13).
The logprob head can also keep its chunks' logits for the backward instead of recomputing them (`Head`): trained
tokens x vocabulary x 2 bytes, for one lm_head product per trained token (~1.8 layer forwards on the 8B ragged
batch); it is kept where the fastest level that fits with it costs less than that (`ladder_cost`).

What the peak is made of, and how each part is known (the ragged 8B case of issue 28 missed the second):
- `static`: what lives through the whole step: weights, the gradients, the optimizer's state. The gradients of
  a step of several micro-batches exist whole from the second micro-batch's backward on (and each
  accumulation adds a transient copy of one parameter's gradient); a probe that starts without them catches
  its peak before most are allocated (~15 GiB low on 8B). So every probe runs with the gradients already
  allocated (zeros), as a later micro-batch does, and `static` is read then. (A step of one micro-batch is
  probed as it runs, its gradients appearing during its backward; the bound adds them, for later steps.)
  Measured (bench/README.md): predicted 133.1 GiB, allocated peak 133.1 over three steps with AdamW; with the
  head's logits kept, 132.7 against 132.2.
- `activations`: measured, peak - static, by running the step's largest micro-batch forward and backward at
  the ladder's ends and middle (all full, all selective, all keeping: stopping at the first that runs out of
  memory; with several ranks only the first two, since one rank's error would leave the others waiting in a
  collective). Along each half of the ladder the peak is linear in the level (a layer changing kind changes
  what it keeps by the same bytes) or convex, so the line between two measurements never predicts less than the
  real peak between them; no level keeping more than was measured is chosen. On one process the gap below the
  choice is then probed, halving it (`_refine`, at most 6 more probes): where all selective ran out of memory
  the ladder alone could only choose all full, and where the peak's slope changes within a gap (the optimizer
  offload) the line is well above it.
- AdamW's state, when its first step has not run yet: two moments per trainable parameter, added exactly.
- Later micro-batches may be longer than this step's largest: activations grow with tokens, so the choice must
  fit `bound` = static + activations x (token cap / probe tokens), the cap being `train.micro_batch_tokens`
  (or, with several ranks and no token budget, micro_batch_size x model.max_model_len). That makes the choice
  safe by construction, so ranks never need to recover from an out-of-memory error together (they cannot:
  the ranks that did not fail wait in a collective). One process without a token budget keeps the step-up
  below as its guard.
- Allocator fragmentation: `auto` turns on the caching allocator's expandable segments (unless
  PYTORCH_CUDA_ALLOC_CONF sets them), so memory freed by micro-batches of other sizes is reused rather than
  stranded in blocks of the wrong size; a 4% margin of the budget covers what is left and the model's error.
- The budget is the device's memory (or the share the process was capped at,
  `torch.cuda.set_per_process_memory_fraction`) less what is outside PyTorch (CUDA context, NCCL).
Under DDP/FSDP2 the ranks take the highest level of their choices: one for all.

Two more settings are chosen with the level, at the first update (`Run.update`):
- `offload_optimizer = "auto"` (`optimizer_offload.py`): the ladder is measured with AdamW's moments on the host
  and without; the offload is kept only where the chooser recomputes fewer layers *whole* with it. Its copies
  cost 0.16-0.19 s a step on an H200 (8B ragged batch), more than the selective layers it spares: at 16,384-token
  micro-batches on the whole card, 4 selective layers with it ran 4.408 s a step, 19 without it 4.244 s; where it
  spares full layers it pays (under a 74.5 GiB cap at 8,192 tokens: 9 full with it, 34 without, 4.922 s
  against 5.589).
- The token budget (`decide_budget`): where the choice at `train.micro_batch_tokens` recomputes layers whole,
  the step is planned again within half the budget (never below `model.max_model_len`, the longest sample) and
  the choice made again; half the tokens keep half the activations a layer, so fewer layers are recomputed,
  for more, smaller micro-batches. Measured on an H200 (8B ragged batch, AdamW): at 16,384 tokens, nothing
  recomputed whole on the whole card (55.9% useful MFU against 54.1% at 8,192); under a 74.5 GiB cap, 26 full
  layers at 16,384 (44.6%) against 9 at 8,192 (48.2%).

An out-of-memory error in a later step (one process) drops the kept logits and moves a quarter of L up the ladder
(never past all full) and redoes that step's update from zeroed gradients (a backward that died midway has summed some gradients and
not others); it is said once. At all layers full, the error is raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MARGIN = 0.04  # of the budget, kept free: what fragmentation leaves with expandable segments, the model's error
GIB = 1024**3
# What a layer of each kind costs, in forwards of one decoder layer (the time a `full` layer adds). Measured on one
# H200, 8B ragged batch (bench/README.md): a full layer ~0.8% of the step, a selective one 13.5 ms of 4.4 s (0.31%)
FULL_COST, SELECTIVE_COST = 1.0, 0.4
REFINE_PROBES = 6  # at most this many probes between the ladder's three (`AutoCheckpointing._refine`)


@dataclass
class Head:
    """The logprob head's option (`algo/logprobs.py`'s keep_logits): keep each chunk's logits for the backward
    rather than recompute them. `cost`: that recompute per trained token, in forwards of one decoder layer per
    token (vocab x hidden / a layer's parameters: 3.2 on 8B)."""

    set_keep: object  # callable(bool)
    bytes_per_row: int  # vocabulary x the logits' element size
    cost: float


def ladder_cost(level: int, layers: int) -> float:
    """The recomputation of `level`, in forwards of one decoder layer."""
    full, selective = kinds(level, layers)
    return full * FULL_COST + selective * SELECTIVE_COST


def kinds(level: int, layers: int) -> tuple[int, int]:
    """Level -> (full layers, selective layers) on the ladder of 2L + 1 levels (0: every layer keeps everything,
    L: every layer selective, 2L: every layer full)."""
    if level <= layers:
        return 0, level
    return level - layers, 2 * layers - level


@dataclass
class Choice:
    level: int
    layers: int
    predicted_peak: int  # bytes at this step's largest micro-batch, optimizer state included
    bound: int  # bytes at the token cap: what the choice must fit
    budget: int  # bytes the run may use
    per_layer: int  # bytes a level down the ladder adds here (one layer changing kind), at the probe's tokens
    keep_logits: bool = False  # the logprob head keeps its logits (their bytes are in the peaks above)

    @property
    def fraction(self) -> float:
        return kinds(self.level, self.layers)[0] / self.layers

    @property
    def selective(self) -> float:
        return kinds(self.level, self.layers)[1] / self.layers

    def describe(self) -> str:
        full, sel = kinds(self.level, self.layers)
        keep = self.layers - full - sel
        bound = (f", {self.bound / GIB:.1f} GiB at the token cap" if self.bound > self.predicted_peak * 1.001 else "")
        head = ", the logprob head keeps its logits" if self.keep_logits else ""
        return (f"activation checkpointing: of {self.layers} layers {full} recomputed whole, {sel} selectively, {keep} "
                f"keep their activations ({self.per_layer / GIB:.2f} GiB a level){head}; predicted peak "
                f"{self.predicted_peak / GIB:.1f}{bound} of {self.budget / GIB:.1f} GiB")


def predict(layers: int, activations: dict[int, int], level: int, scale: float = 1.0) -> tuple[int, int, int]:
    """(activations at this step's largest micro-batch, at the token cap, bytes a level up frees there) at
    `level`: the line through the measurements on either side (`level` >= the lowest measured)."""
    points = sorted(activations.items())
    (l0, a0), (l1, a1) = next(((p, q) for p, q in zip(points, points[1:]) if p[0] <= level <= q[0]),
                              (points[-1], points[-1]))
    slope = (a0 - a1) // max(l1 - l0, 1)
    act = a0 - (level - l0) * slope if l1 > l0 else a0
    return act, int(act * max(scale, 1.0)), slope


def choose(layers: int, activations: dict[int, int], static: int, budget: int, extra: int = 0, scale: float = 1.0,
           margin: float = MARGIN, grads: int = 0, logits: int = 0, logits_gain: float = 0.0) -> Choice:
    """The lowest ladder level whose bound fits `budget` less the margin. `activations`: measured peak above
    `static` by level; `extra`: bytes allocated later (AdamW's state); `scale`: token cap / probe tokens (>= 1);
    `grads`: bytes the bound adds for gradients the probe did not hold whole (a step of one micro-batch);
    `logits`: bytes the head's kept logits add at the probe's micro-batch (0: no such option), which save
    `logits_gain` forwards of a layer: kept where the fastest level that fits with them costs less than that gain
    more than the fastest level without (`ladder_cost`).
    Between two measurements the activations are the line through them; levels below the lowest measured are
    never chosen. All layers full when even that does not fit (the run may still fit: it is said)."""
    limit = int(budget * (1 - margin))
    plain = with_logits = None
    for level in range(min(activations), 2 * layers + 1):
        choice = at_level(layers, activations, static, budget, extra, scale, level, grads)
        if plain is None and choice.bound <= limit:
            plain = choice
        if logits and with_logits is None and choice.bound + int(logits * max(scale, 1.0)) <= limit:
            with_logits = at_level(layers, activations, static, budget, extra, scale, level, grads, logits)
    if with_logits is not None and (plain is None or ladder_cost(with_logits.level, layers) - logits_gain
                                    < ladder_cost(plain.level, layers)):
        return with_logits
    return plain or choice


def at_level(layers: int, activations: dict[int, int], static: int, budget: int, extra: int, scale: float,
             level: int, grads: int = 0, logits: int = 0) -> Choice:
    """The choice of `level` (`choose`'s arguments; `logits` > 0: with the head's logits kept)."""
    act, capped, slope = predict(layers, activations, level, scale)
    act, capped = act + logits, capped + int(logits * max(scale, 1.0))
    return Choice(level, layers, static + extra + act, static + extra + grads + capped, budget, slope, logits > 0)


def step_up(level: int, layers: int) -> int:
    """The next level after an out-of-memory error: a quarter of the layers up the ladder (at least one)."""
    return min(2 * layers, level + max(1, round(layers / 4)))


def optimizer_state_bytes(params: list[torch.Tensor]) -> int:
    """What AdamW allocates at its first step: two moments per trainable parameter, in the parameter's dtype (the
    local shard's under FSDP2)."""
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += 2 * local.numel() * local.element_size()
    return total


def gradient_bytes(params: list[torch.Tensor]) -> int:
    """The gradients of the trainable parameters (the local shard's under FSDP2)."""
    return sum(optimizer_state_bytes([p]) // 2 for p in params)


def device_budget(device: torch.device) -> int:
    """Bytes this process may allocate on `device`: its memory, times the share it was capped at."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (torch >= 2.12)
    share = get(index) if get is not None else _SET_FRACTION.get(index, 1.0)
    return int(total * share)


_SET_FRACTION: dict[int, float] = {}  # torch < 2.12 cannot read the cap back: remembered where it is set


def _remember_fraction():
    """Wrap `torch.cuda.set_per_process_memory_fraction` (once) so a torch without its getter still knows the cap."""
    setter = torch.cuda.set_per_process_memory_fraction
    if getattr(setter, "_vlrl", False) or hasattr(torch.cuda, "get_per_process_memory_fraction"):
        return

    def set_fraction(fraction, device=None):
        index = torch.cuda._utils._get_device_index(device) if device is not None else torch.cuda.current_device()
        _SET_FRACTION[index] = float(fraction)
        return setter(fraction, device)

    set_fraction._vlrl = True
    torch.cuda.set_per_process_memory_fraction = set_fraction


_remember_fraction()


def expandable_segments() -> None:
    """Turn the caching allocator's expandable segments on (segments grow in place, so freed memory of any size
    is reused), unless the user's PYTORCH_CUDA_ALLOC_CONF says otherwise."""
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    setting = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # (torch >= 2.10; the old name warns)
               or torch.cuda.memory._set_allocator_settings)
    try:
        setting("expandable_segments:True")
    except (AttributeError, RuntimeError):  # (an allocator without them)
        pass


class AutoCheckpointing:
    """A run's `checkpoint_fraction = "auto"`: decided at its first update, stepped up after an OOM.

    `set_kinds(full, selective)` applies fractions of layers to the model; `layers` is its number of decoder
    layers. On the CPU there is no device memory to measure or run out of: every layer is recomputed, as the
    default fraction 1."""

    def __init__(self, set_kinds, layers: int, device: torch.device, head: Head | None = None):
        self.set_kinds, self.layers, self.device, self.head = set_kinds, layers, device, head
        self.level: int | None = None
        self.choice: Choice | None = None
        self.measured: dict[int, int] = {}  # level -> peak (bytes) of the last decision's ladder, AdamW's to come not in
        self.stepped_up = False
        self.out_of_memory: set[int] = set()  # levels whose probe ran out of memory (the last ladder measured)
        self.offload_declined = False  # `decide(probe_without_offload=...)` found the optimizer offload buys nothing
        if device.type == "cuda":
            expandable_segments()

    @property
    def fraction(self) -> float | None:
        return None if self.level is None else kinds(self.level, self.layers)[0] / self.layers

    @property
    def selective(self) -> float | None:
        return None if self.level is None else kinds(self.level, self.layers)[1] / self.layers

    def decide(self, probe, params: list[torch.Tensor], optimizer_has_state: bool, agree, distributed: bool = False,
               probe_tokens: int = 1, token_cap: int | None = None, accumulates: bool = True,
               probe_trained: int | None = None, offloaded: int = 0, probe_without_offload=None) -> str:
        """Run `probe()` (the step's largest micro-batch, `probe_tokens` long, forward and backward; it drops its
        gradients after) at the ladder's levels (module docstring), choose, and agree on the level with the other
        ranks (`agree(values, "max")`). `token_cap`: the longest micro-batch a later step may have (None:
        unknown). `accumulates`: this step has several micro-batches, so each probe runs with the gradients
        allocated first; a step of one micro-batch is probed as it runs (its gradients appear during its
        backward) and the bound adds the gradients' bytes, for later steps that accumulate. `probe_trained`: the
        probe's trained tokens (the logprob head's rows; default all). `offloaded`: bytes of AdamW's state kept on
        the host between steps (`optimizer_offload.py`; their fetch in the last backward is in the probe's peak).
        `probe_without_offload` (`offload_optimizer = "auto"`): `probe` without the moments' fetch; the ladder is
        measured with it too, and the offload is kept only where it lets the chooser recompute fewer layers whole
        (module docstring); otherwise `offload_declined` is set and the choice is the one without. Returns the
        sentence to print."""
        if self.device.type != "cuda":
            self._apply(2 * self.layers)
            return "activation checkpointing: auto on the CPU recomputes every layer (no device memory to measure)"
        L = self.layers
        if self.head is not None:
            self.head.set_keep(False)
        activations, static, peaks = self._measure(probe, params, accumulates, distributed)
        if not activations:  # nothing to choose from: the step will raise the same error, this says what to change
            self._apply(2 * L)
            return ("activation checkpointing: the step's largest micro-batch runs out of GPU memory even with every "
                    "layer recomputed; lower train.micro_batch_tokens (or train.micro_batch_size)")
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, NCCL: not PyTorch's
        budget = device_budget(self.device) - max(outside, 0)
        extra = 0 if optimizer_has_state else max(0, optimizer_state_bytes(params) - offloaded)
        scale = max(1.0, token_cap / probe_tokens) if token_cap else 1.0
        grads = 0 if accumulates else gradient_bytes(params)  # a later step's, on top of what was measured
        rows = probe_tokens if probe_trained is None else probe_trained
        logits = self.head.bytes_per_row * rows if self.head is not None else 0
        gain = self.head.cost * rows / probe_tokens if self.head is not None else 0.0
        def rechoose(act):
            return choose(L, act, static, budget, extra, scale, grads=grads, logits=logits, logits_gain=gain)

        choice = rechoose(activations)
        if not distributed:
            choice = self._refine(probe, params, accumulates, activations, peaks, choice, rechoose)
        self.offload_declined = False
        if probe_without_offload is not None and offloaded:
            # the same ladder without the moments' fetch in the last backward, every moment on the device (on a
            # resume the offloaded ones come back): the offload stays only where it lets the chooser recompute less
            plain_act, plain_static, plain_peaks = self._measure(probe_without_offload, params, accumulates,
                                                                 distributed)
            extra_off = offloaded if optimizer_has_state else optimizer_state_bytes(params)

            def rechoose_plain(act):
                return choose(L, act, plain_static, budget, extra_off, scale, grads=grads, logits=logits,
                              logits_gain=gain)

            plain = rechoose_plain(plain_act) if plain_act else None
            if plain is not None and not distributed:
                plain = self._refine(probe_without_offload, params, accumulates, plain_act, plain_peaks, plain,
                                     rechoose_plain)

            # kept only where it spares layers recomputed whole (the module docstring says why)
            if plain is not None and kinds(plain.level, L)[0] <= kinds(choice.level, L)[0]:
                choice, extra, self.offload_declined = plain, extra_off, True
                activations, static, peaks = plain_act, plain_static, plain_peaks
        self.measured = dict(peaks)  # (this decision's ladder)
        # one level and one head setting for all ranks: the highest level; logits kept only where every rank keeps them
        level, drop = (int(v) for v in agree([float(choice.level), float(not choice.keep_logits)], "max"))
        said = ""
        if level != choice.level or (drop and choice.keep_logits):  # another rank's: with this rank's numbers
            choice = at_level(L, activations, static, budget, extra, scale, level, grads, 0 if drop else logits)
            said = " (the highest of the ranks' choices)"
        self.choice = choice
        self._apply(level)
        if self.head is not None:
            self.head.set_keep(choice.keep_logits)
        return choice.describe() + said

    def decide_budget(self, decide_at, budget: int | None, floor: int) -> tuple[int | None, str]:
        """The token budget and the choice made within it (module docstring): `decide_at(budget)` plans the
        step within `budget` tokens a micro-batch and calls `decide` on it, returning its sentence. Halved while
        the choice recomputes layers whole and half is at least `floor`; a half that spares no full layer is
        undone (the choice within the larger budget restored). Returns (budget, the sentence to print)."""
        said = decide_at(budget)
        asked = budget
        while budget is not None and self.choice is not None and budget // 2 >= floor:
            full = kinds(self.choice.level, self.layers)[0]
            if full == 0:
                break
            before = (self.choice, self.offload_declined, self.measured, said)
            said = decide_at(budget // 2)
            if kinds(self.choice.level, self.layers)[0] >= full:  # (the static part alone is over the budget)
                self._adopt(*before[:3])
                said = before[3]
                break
            budget //= 2
        if budget != asked:
            said += (f"; micro-batches within {budget} tokens, not train.micro_batch_tokens = {asked}: that many "
                     "would need more layers recomputed whole")
        return budget, said

    def _adopt(self, choice: Choice, offload_declined: bool, measured: dict[int, int]) -> None:
        """Go back to an earlier choice (`decide_budget`)."""
        self.choice, self.offload_declined, self.measured = choice, offload_declined, measured
        self._apply(choice.level)
        if self.head is not None:
            self.head.set_keep(choice.keep_logits)

    def _measure(self, probe, params, accumulates: bool,
                 distributed: bool) -> tuple[dict[int, int], int, dict[int, int]]:
        """Run `probe` at the ladder's levels: ({level: peak above static}, static, {level: peak}). Stops at the
        first level that runs out of memory (recorded in `self.out_of_memory`)."""
        L = self.layers
        activations: dict[int, int] = {}  # level -> peak above static
        peaks: dict[int, int] = {}
        static = 0
        self.out_of_memory = set()
        for level in (2 * L, L + L // 2) if distributed else (2 * L, L, 0):
            measured = self._probe_at(probe, params, accumulates, level)
            if measured is None:  # keeping this many layers' activations does not fit at all
                break
            static, peaks[level] = measured
            activations[level] = peaks[level] - static
        return activations, static, peaks

    def _probe_at(self, probe, params, accumulates: bool, level: int) -> tuple[int, int] | None:
        """`probe` at `level`: (static, peak) bytes, or None where it ran out of memory."""
        self._apply(level)
        for p in params if accumulates else ():  # as at a later micro-batch: the step's gradients exist
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.cuda.synchronize(self.device)
        static = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            probe()
        except torch.OutOfMemoryError:
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
            self.out_of_memory.add(level)
            return None
        torch.cuda.synchronize(self.device)
        return static, torch.cuda.max_memory_allocated(self.device)

    def _refine(self, probe, params, accumulates: bool, activations: dict[int, int], peaks: dict[int, int],
                choice: Choice, rechoose) -> Choice:
        """Probe between the chosen level and the nearest level below it that is known not to be chosen (it ran
        out of memory, or it was measured and not chosen), halving the gap, at most `REFINE_PROBES` times, until a
        probe lands on the line through its neighbours (1%: the rest of the gap is that line too);
        `rechoose(activations)` chooses again with each new measurement. Why: the ladder's three probes leave
        wide gaps. Where the all-selective probe runs out of memory only all-full is measured, and no level below
        it could be chosen; and the line between two measurements can be well above the real peak where what
        binds the peak changes within the gap (with the optimizer offload, the moments' fetch in the last
        backward with layers recomputed whole, the activations at the backward's start with selective ones).
        One process only: an out-of-memory probe on one rank would leave the others waiting in a collective."""
        L = self.layers
        for _ in range(REFINE_PROBES):
            failing = [lv for lv in self.out_of_memory | set(activations) if lv < choice.level]
            if not failing or choice.level - max(failing) <= 1:
                break
            level = (max(failing) + choice.level) // 2
            lined = predict(L, activations, level)[0] if min(activations) < level else None
            measured = self._probe_at(probe, params, accumulates, level)
            if measured is not None:
                static, peaks[level] = measured
                activations[level] = peaks[level] - static
            choice = rechoose(activations)
            if measured is not None and lined is not None and abs(activations[level] - lined) <= 0.01 * lined:
                break
        return choice

    def step_up(self) -> str | None:
        """After an out-of-memory error: the next level, or None when every layer is recomputed already."""
        keeps = self.choice is not None and self.choice.keep_logits
        if self.level is None or (self.level >= 2 * self.layers and not keeps):
            return None
        if keeps:  # the head's logits go first, with the quarter of the layers
            self.head.set_keep(False)
            self.choice.keep_logits = False
        before = self.level
        self._apply(step_up(before, self.layers))
        f0, s0 = kinds(before, self.layers)
        f1, s1 = kinds(self.level, self.layers)
        note = "" if self.stepped_up else (f"out of GPU memory with {f0} of {self.layers} layers recomputed whole and "
                                          f"{s0} selectively: now {f1} and {s1}, and the step's update redone")
        self.stepped_up = True
        return note

    def _apply(self, level: int) -> None:
        self.level = level
        full, sel = kinds(level, self.layers)
        self.set_kinds(full / self.layers, sel / self.layers)
