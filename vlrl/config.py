"""The run configuration: pydantic models only. Every default and every cross-field rule lives here.

A run is one TOML file (see `configs/`), optionally changed by `--set a.b=value` overrides. Unknown keys are
errors (`extra="forbid"`), and every error names the key path and the file it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(UserError):
    """A config file or override the user can fix; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    path: str = "Qwen/Qwen3-VL-8B-Instruct"
    """Model directory or hub id (a Qwen3-VL checkpoint in Hugging Face format)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype. `auto`: bfloat16 on GPU, float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of the trainer's model. Packed micro-batches (`train.packing`) need `sdpa` (their
    attention is one of `packed_attention`'s routes); with `eager` or `flash_attention_2` the update is
    padded."""
    packed_attention: Literal["auto", "varlen", "flex", "sdpa"] = "auto"
    """How a packed micro-batch's attention stays within each sample: `varlen` (torch's varlen flash
    attention, CUDA, bf16/fp16), `flex` (FlexAttention with a document mask; no backward on the CPU), `sdpa`
    (attention re-padded per sample, causal within each sample's length; projections and MLPs stay packed: the
    CPU's route). `auto`: varlen on CUDA in bf16/fp16, flex on CUDA in float32, sdpa on the CPU."""
    trust_remote_code: bool = False
    """Allow code shipped with the checkpoint to run. Off unless you trust the checkpoint's source."""
    min_pixels: int = Field(64 * 32 * 32, gt=0)
    """Smallest image area in pixels after resizing. One pixel policy serves trainer and sampler."""
    max_pixels: int = Field(640 * 32 * 32, gt=0)
    """Largest image area in pixels after resizing; images are resized down to it before tokenisation and
    before they are sent to the sampler, so trainer and server see the same image tokens."""
    max_images_per_prompt: int = Field(4, ge=0)
    """Most images one prompt may hold; must not exceed the server's `--limit-mm-per-prompt image=N`."""
    max_model_len: int = Field(8192, gt=0)
    """Longest sequence (prompt with image tokens + completion) in tokens, as the server's
    `--max-model-len`."""
    image_max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    """Largest encoded image accepted (file, download or base64 payload), in bytes."""
    image_max_decoded_pixels: int = Field(64 * 1024 * 1024, gt=0)
    """Largest image area accepted before resizing (decompression-bomb guard)."""
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    """Connect/read timeout for http(s) images and videos."""
    max_videos_per_prompt: int = Field(0, ge=0)
    """Most videos one prompt may hold (0: no video). Must not exceed the server's `--limit-mm-per-prompt
    video=N`; with a vLLM server at most 1 (vLLM 0.32 takes one frame-timestamp list per request)."""
    video_fps: float = Field(2.0, gt=0)
    """Frames sampled per second of video (Qwen3-VL's own default), within video_min_frames..video_max_frames.
    One frame policy serves trainer and sampler: the trainer samples and resizes the frames once and the
    server receives those frames, with their timestamps."""
    video_min_frames: int = Field(4, ge=2)
    """Fewest frames sampled from a video (fewer when the video has fewer); Qwen3-VL needs at least 2."""
    video_max_frames: int = Field(32, ge=2)
    """Most frames sampled from a video; a longer video is sampled evenly over its whole length."""
    video_min_pixels: int = Field(16 * 32 * 32, gt=0)
    """Smallest area of a sampled frame in pixels after resizing."""
    video_max_pixels: int = Field(256 * 32 * 32, gt=0)
    """Largest area of a sampled frame in pixels after resizing (`vlrl serve --video-max-pixels`)."""
    video_max_tokens: int = Field(4096, gt=0)
    """Most placeholder tokens one video may take, all its frames together (two frames share each token
    grid): frames are resized below video_max_pixels when the sampled frames would exceed it."""
    video_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Largest encoded video accepted (file, download or base64 payload), in bytes."""
    video_max_decoded_pixels: int = Field(4096 * 4096, gt=0)
    """Largest frame area accepted before resizing (width x height of the video stream)."""
    video_max_duration_s: float = Field(3600.0, gt=0)
    """Longest video accepted, in seconds."""
    video_decode_timeout_s: float = Field(60.0, gt=0)
    """A video whose decoding (or download) takes longer than this is skipped as a bad sample."""
    freeze_vision: bool = True
    """Keep the vision tower (and its merger) frozen during training."""
    lora_rank: int = Field(0, ge=0)
    """LoRA rank on the language model's linear layers (peft, `pip install 'vlrl[lora]'`); 0 trains all
    weights."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_target_modules: list[str] | None = None
    """Module names LoRA adapts (the vision tower's layers have other names and stay untouched). Unset: the
    family's attention and MLP projections: q/k/v/o_proj, gate/up/down_proj, and on Qwen3.5 its Gated DeltaNet
    layers' in_proj_qkv, in_proj_z and out_proj too. A mixture-of-experts model's experts are not modules of
    these names: `lora_experts` adapts them."""
    experts_implementation: Literal["grouped_mm", "vlrl", "eager", "batched_mm"] = "grouped_mm"
    """Mixture-of-experts models: how the routed experts compute. `grouped_mm`: every expert's tokens in one
    grouped matrix product per projection (transformers'; its permutation's backward is an accumulating
    `index_put`). `vlrl`: the same products, the tokens moved to and from expert order by gathers whose
    backward gathers too (adapters/moe_experts.py; exact, not yet measured faster on a GPU: README).
    `eager`: transformers' Python loop over experts (14.7x slower than grouped_mm on an H200,
    ENVIRONMENT.md). Ignored by dense models."""
    lora_experts: bool = False
    """Mixture-of-experts models with `lora_rank > 0`: LoRA on the routed experts' weights too (peft's
    parameter targeting of `gate_up_proj` / `down_proj`). Off: LoRA on attention only, experts frozen."""


JUDGE_TEMPLATE = """You grade a student's answer against a reference answer.

Question: {question}
Reference answer: {answer}
Student's answer: {completion}

Is the student's final answer correct, judged against the reference? Think briefly, then end with one line
"Score: N" where N is 0 (wrong) to 10 (fully correct)."""


class JudgeConfig(Section):
    """An LLM judge behind any OpenAI-compatible chat API (a second `vlrl serve`, vLLM, OpenAI...)."""

    base_url: str
    """The API's base URL with its version path, e.g. http://127.0.0.1:8001/v1 (a second `vlrl serve`) or
    https://api.openai.com/v1; requests go to `<base_url>/chat/completions`."""
    model: str | None = None
    """Model name sent with each request; unset: the first model the endpoint lists at `<base_url>/models`."""
    api_key_env: str = "JUDGE_API_KEY"
    """Environment variable holding the API key (sent as a bearer token when set); keys never go in
    configs."""
    template: str = JUDGE_TEMPLATE
    """The judge's user message: `{completion}` (required), `{question}` and `{answer}` are filled in (write
    `{{` and `}}` for literal braces). The judge sees text only, not the images."""
    system_prompt: str | None = None
    """System message of each judge request (none when unset)."""
    answer_only: bool = True
    """Fill `{completion}` with only the text after the last `</think>`, so the judge grades the answer."""
    score_pattern: str = r"(?i)score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)"
    """Regular expression whose one group captures the score in the reply; the last match counts. A reply
    without a match is a reward failure (`unparseable`)."""
    max_score: float = Field(10.0, gt=0)
    """The best score: the reward is score / max_score; a score outside [0, max_score] is `unparseable`."""
    max_tokens: int = Field(512, ge=1)
    """Most tokens of a judge reply."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the judge (0: its most likely verdict)."""
    extra_body: dict[str, Any] = {}
    """Fields added to every request body, e.g. vLLM's `structured_outputs = {regex = "Score: (10|[0-9])"}`
    to force a parseable reply, or `chat_template_kwargs = {enable_thinking = false}`."""
    max_concurrency: int = Field(16, ge=1)
    """Most judge requests in flight at once."""
    timeout_s: float = Field(120.0, gt=0)
    """Timeout of one judge request."""
    max_retries: int = Field(2, ge=0)
    """Retries of a request that failed for a transient reason (connection, timeout, 429, 5xx), with
    exponential backoff; then the sample's judgement is a reward failure (`judge_failed`)."""
    retry_backoff_s: float = Field(1.0, gt=0)
    """First retry delay; doubles on each retry (capped at 30 s)."""

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        try:
            names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(f"is not a valid template ({e}); write {{{{ and }}}} for literal "
                             "braces") from None
        unknown = names - {"question", "answer", "completion"}
        if unknown:
            raise ValueError(f"uses {{{', '.join(sorted(unknown))}}}: only {{question}}, {{answer}} and "
                             "{completion} "
                             "are filled in (write {{ and }} for literal braces)")
        if "completion" not in names:
            raise ValueError("must contain {completion}")
        return v

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"is not a regular expression ({e})") from None
        if groups != 1:
            raise ValueError(f"must have exactly one group, the score (it has {groups})")
        return v


class RewardSpec(Section):
    fn: str
    """A built-in reward (exact_match, choice, multiple_choice, numeric, format, iou, math, judge) or
    `module:function`, a function (completion: str, sample: Sample) -> float."""
    weight: float = 1.0
    """Weight in the weighted sum that makes a sample's reward."""
    judge: JudgeConfig | None = None
    """Settings of the `judge` reward (`[env.rewards.judge]` right after its `[[env.rewards]]`); only
    there."""

    @model_validator(mode="after")
    def _judge_settings(self) -> RewardSpec:
        if self.fn == "judge" and self.judge is None:
            raise ValueError('fn = "judge" needs its settings: add [env.rewards.judge] with at least '
                             'base_url')
        if self.fn != "judge" and self.judge is not None:
            raise ValueError(f"judge settings given for fn = {self.fn!r}; they belong to a fn = \"judge\" "
                             "reward")
        return self


class EnvConfig(Section):
    dataset: str = "builtin:colors"
    """Where prompts come from: `builtin:NAME` (synthetic visual tasks: colors, shapes, count, position;
    motion, a video task; with their environments: zoom, calculator), a `.jsonl` or `.parquet` file, a
    directory written by `datasets.save_to_disk`, or `hf:NAME` (a Hugging Face hub dataset; needs hub
    access)."""
    eval_dataset: str | None = None
    """Eval split from a separate file/dir (same forms as `dataset`). Unset for files: `eval_size` rows are
    held out of `dataset` (deterministic by seed). Ignored by built-in tasks, which have their own split."""
    train_split: str = "train"
    """Split name for `hf:` datasets and dataset directories with splits."""
    eval_split: str = "test"
    """Eval split name for `hf:` datasets and dataset directories with splits."""
    question_field: str = "question"
    """Column holding the question text."""
    answer_field: str = "answer"
    """Column holding the answer the rewards check."""
    image_field: str = "images"
    """Column holding the image(s): one source or a list (path relative to the data file, URL, data URI,
    base64, or a Hugging Face Image feature)."""
    video_field: str = "videos"
    """Column holding the video(s): one source or a list of videos, each a video file (mp4, webm, mkv...: a
    path relative to the data file, URL, data URI or base64), a list of frame images (shown at
    model.video_fps), or `{"frames": [...], "fps": F}`. Videos come after the images, before the question."""
    id_field: str = "id"
    """Column holding a sample id (row number when absent)."""
    train_size: int = Field(512, gt=0)
    """Samples in the train split of a built-in task."""
    eval_size: int = Field(64, gt=0)
    """Samples in the eval split of a built-in task, or held out of a file without `eval_dataset`."""
    image_size: int = Field(64, ge=32)
    """Side in pixels of the images a built-in task draws."""
    system_prompt: str | None = None
    """System message put before every prompt (none when unset)."""
    question_template: str = "{question}"
    """Template of the user text; `{question}` is replaced by the sample's question."""
    image_marker: str = "<image>"
    """Text in a question that marks where an image goes (LLaVA / EasyR1 datasets, e.g. geometry3k's
    "<image>Find x."): the sample's images are placed at the markers, in order, and the markers removed; a
    question without markers gets its images first. "" keeps markers as plain text."""
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(fn="exact_match")])
    """Reward functions; a sample's reward is their weighted sum."""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """A sample whose image is missing/corrupt/unreachable or whose prompt cannot fit: `skip` it (counted
    in the metrics as `bad_samples`, listed in `<run dir>/bad_samples.jsonl`), or stop with the `error`."""
    reward_timeout_s: float = Field(10.0, gt=0)
    """A reward call running longer than this marks the sample as failed (the run goes on); `math` and your
    own functions run in worker processes that are killed at this limit. The judge has its own timeouts."""
    environment: str | None = None
    """A multi-turn environment (tools, feedback): `builtin:zoom`, `builtin:calculator`, or your own
    `module:Class` (a subclass of vlrl.envs.environment.Environment). Unset: single-turn, one completion per
    prompt; a built-in task that belongs to an environment (`builtin:zoom`) brings its own."""
    max_turns: int = Field(4, ge=1)
    """Most assistant turns in a multi-turn episode; an episode still going then ends (finish reason
    `max_turns`). A whole trajectory also stays within model.max_model_len (finish `context`) and
    model.max_images_per_prompt images (finish `images`)."""
    tool_timeout_s: float = Field(10.0, gt=0)
    """A tool call running longer than this is abandoned and the model gets an error as its result."""

    @field_validator("question_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain {question}")
        return v


class RolloutConfig(Section):
    server_url: str | None = None
    """Base URL of a vLLM server started by `vlrl serve` (e.g. http://127.0.0.1:8000). Unset: rollouts are
    sampled in process by the policy itself (the embedded backend)."""
    api_key_env: str = "VLLM_API_KEY"
    """Environment variable holding the server's API key (sent as a bearer token when set); keys never go
    in config files."""
    max_concurrency: int = Field(32, ge=1)
    """Most chat requests in flight to the server at once (one request per prompt, n = group_size)."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Timeout of one request to the server."""
    max_retries: int = Field(8, ge=0)
    """Retries of a request (sampling, weight reload, the control routes) that failed for a transient reason
    (connection lost, 5xx, 429, timeout), with exponential backoff; a server that went away is waited for this
    long, then the run saves a checkpoint of its last completed step and stops (exit code 1; `--resume`)."""
    retry_backoff_s: float = Field(1.0, gt=0)
    """First retry delay; doubles on each retry (capped at 30 s)."""
    image_transport: Literal["data_uri", "file"] = "data_uri"
    """How images reach the server: PNG data URIs (lossless, already resized), or `file://` paths to PNGs
    written under the run directory (needs `vlrl serve --allowed-local-media-path`; same machine only)."""
    weight_sync: Literal["disk", "nccl"] = "disk"
    """How updated weights reach the server: `disk` (safetensors + reload_weights; one node, no set-up) or
    `nccl` (vLLM's weight-transfer engine; GPU servers started with `vlrl serve --weight-sync nccl`)."""
    sync_dir: str | None = None
    """Directory the disk sync writes weights to (must be readable by the server). Unset: shared memory
    (`/dev/shm/vlrl-sync-<run>`, removed when the run ends) when the server is on this machine (a loopback
    server_url) and /dev/shm has room for the weights plus a quarter; else `<run dir>/weights`."""
    nccl_master_address: str = "127.0.0.1"
    """Address of the NCCL rendezvous between the trainer (rank 0) and the server's workers."""
    nccl_master_port: int = Field(29555, gt=0, lt=65536)
    """Port of the NCCL rendezvous."""
    max_off_policy_steps: int = Field(0, ge=0)
    """Asynchronous rollouts (server backend only): a producer keeps the server generating the next steps'
    groups while the learner trains, and a step trains groups sampled by weights up to this many optimizer
    steps old (older ones are dropped and counted, never trained). 0: synchronous (each step samples, then
    trains); 1: one-step-off-policy; 2-4 hide most generation time when it exceeds the update's
    (bench/async_rollouts.py). A step's update begins with its first finished groups
    (`train.streamed_update`). The importance ratio against the sampler's logprobs corrects the staleness
    (`algorithm.is_correction`)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "one_step_off_policy" in values:
            raise ValueError("rollout.one_step_off_policy is now rollout.max_off_policy_steps: set it to 1 for "
                             "one-step-off-policy rollouts (or 2-4 for more overlap), 0 for none")
        return values
    group_size: int = Field(8, ge=1)
    """Completions sampled per prompt (the GRPO group); at least 2, since advantages are relative to the
    group."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts per optimizer step; a step trains on prompts_per_step * group_size samples."""
    max_new_tokens: int = Field(512, ge=1)
    """Most tokens sampled per completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the trainer scales its logits by the same value."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling. Below 1 the sampler's logprobs are renormalised over the nucleus and no longer
    equal the trainer's; the truncated importance weights absorb the difference."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it (the RL default)."""
    seed: int = 0
    """Seed of the embedded sampler (with the same weights and prompts, the same rollouts); a vLLM server is
    sent no seed, so its rollouts are not reproducible."""
    static_cache: bool = False
    """Embedded sampler only: a static KV cache, whose decoding step transformers compiles on CUDA (faster
    after a warm-up; see bench/README.md)."""

    @field_validator("group_size")
    @classmethod
    def _a_group_to_compare(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                "a sample's advantage is its reward minus its group's mean, always 0 in a group of one, so "
                "nothing would be learned; set rollout.group_size to 2 or more (8 to 16 is usual)"
            )
        return v


class AlgorithmConfig(Section):
    advantage: Literal["grpo", "rloo"] = "grpo"
    """Group baseline: `grpo` (reward minus group mean) or `rloo` (leave-one-out mean)."""
    std_normalize: bool = True
    """Divide advantages by the group's reward std (GRPO). Off for Dr.GRPO (arXiv:2503.20783)."""
    policy_loss: Literal["token", "sequence"] = "token"
    """`token`: per-token clipped ratio (PPO/GRPO/DAPO). `sequence`: length-normalised sequence ratio
    (GSPO)."""
    clip_low: float = Field(0.2, ge=0)
    """Lower clip range: the ratio is clipped at 1 - clip_low."""
    clip_high: float = Field(0.28, ge=0)
    """Upper clip range: 1 + clip_high; above clip_low is DAPO's clip-higher (arXiv:2503.14476)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    """Loss normalisation: over all trained tokens of the step, per-sequence means averaged, or a constant
    (Dr.GRPO: divided by samples * max_new_tokens)."""
    ratio_cap: float = Field(3.0, gt=1)
    """Cap on the importance ratio pi_trainer / pi_sampler for negative advantages (dual clip,
    arXiv:1912.09729). With the PPO clip it truncates every importance weight of the loss."""
    mask_ratio: float = Field(10.0, gt=1)
    """Tokens whose trainer/sampler probability ratio is above this (or below its inverse) get no loss."""
    is_correction: Literal["ratio", "tis", "icepop"] = "ratio"
    """How the loss corrects for rollouts the trainer's weights did not sample (sampler/trainer mismatch,
    stale asynchronous rollouts). `ratio`: the PPO ratio is taken against the sampler's logprobs, clipped,
    dual-clipped at `ratio_cap`, masked beyond `mask_ratio`. `tis` (truncated importance sampling, Yao et
    al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"): decoupled, the PPO
    ratio against the trainer's own logprobs and each token weighted by the trainer/sampler ratio truncated
    at `tis_cap`. `icepop` (Ling team 2025, "IcePop": masked importance sampling): decoupled, the weight is
    the ratio inside [`icepop_low`, `icepop_high`] and 0 outside (a token there gets no gradient)."""
    is_level: Literal["token", "sequence"] = "token"
    """Where `tis`/`icepop` take the trainer/sampler ratio: per token, or per sequence (Liu et al. 2025,
    "When speed kills stability": sequence-level IS; `tis` truncates the product of the sequence's token
    ratios, `icepop` masks whole sequences whose geometric-mean ratio leaves the band)."""
    tis_cap: float = Field(2.0, gt=1)
    """The truncation of `tis` weights."""
    icepop_low: float = Field(0.5, gt=0, lt=1)
    """The low end of `icepop`'s band of kept ratios."""
    icepop_high: float = Field(2.0, gt=1)
    """The high end of `icepop`'s band of kept ratios."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the k3 KL penalty to a frozen reference model (0: no reference model is loaded)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all equal (zero advantage) and sample more prompts to refill (DAPO)."""
    max_refill_rounds: int = Field(3, ge=0)
    """With dynamic sampling, most extra sampling rounds per step."""
    mask_truncated: bool = False
    """Overlong masking: completions cut by max_new_tokens (finish `length`) get no loss; a trajectory that
    ran out of model.max_model_len (`context`) is trained on."""
    routing_replay: bool | None = None
    """Mixture-of-experts models: the trainer routes every token to the experts the sampler routed it to
    (routing replay; the router's weights over those experts still train), so trainer and sampler logprobs
    differ by numerics only, not by expert choices. Unset: on for mixture-of-experts models. Needs the
    sampler's routing: the embedded sampler records it; a vLLM server returns it when started by `vlrl
    serve` on a GPU (`--enable-return-routed-experts`); tokens without it are routed by the trainer's router
    (counted as `routing_replayed` < 1)."""
    router_aux_loss_coef: float = Field(0.0, ge=0)
    """Mixture-of-experts models: weight of the router's load-balancing loss (Switch Transformer,
    arXiv:2101.03961, eq. 4-6, over each micro-batch's tokens) added to the policy loss, weighted by each
    micro-batch's share of the step's trained tokens; logged as `router_aux_loss`. 0: off (RL fine-tuning
    of a balanced pretrained router rarely needs it)."""


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    """Optimizer steps (one per batch of rollouts)."""
    max_steps_without_update: int = Field(5, ge=1)
    """Stop the run after this many steps in a row that trained nothing (under dynamic sampling, every group's
    rewards agreed within algorithm.max_refill_rounds; or every reward failed): a reward that never varies
    gives no signal, and each such step costs its sampling rounds for nothing. Each such step is also said as
    it happens."""
    learning_rate: float = Field(1e-6, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping by global norm."""
    packing: bool = True
    """Packed micro-batches: the samples of a micro-batch concatenated into one sequence, no padding computed,
    attention kept within each sample (`model.packed_attention`); samples assigned to micro-batches by
    first-fit decreasing length within `micro_batch_tokens` and `micro_batch_patches`, and (several ranks)
    balanced across ranks by tokens. The gradient is that of padded micro-batches (tested to 1e-6). False:
    padded micro-batches, in order. Used padded anyway, with a warning saying why, when the model's
    attention is not `sdpa` (`model.attn_implementation`)."""
    streamed_update: bool = True
    """With asynchronous rollouts (`rollout.max_off_policy_steps` > 0), one process or DDP: a step's update
    begins with its first finished groups, each micro-batch they fill run while the server samples the rest
    (vlrl/streamed_update.py; the same gradient to rounding). False: the update waits for the step's last
    group."""
    micro_batch_size: int = Field(8, ge=1)
    """Padded micro-batches: most samples per forward/backward pass (gradient accumulation over
    micro-batches). Packed ones hold any number of samples within `micro_batch_tokens`; with no token budget
    set, their budget is micro_batch_size x the step's longest sample (the most a padded micro-batch of that
    step computes)."""
    micro_batch_tokens: int | None = Field(None, gt=0)
    """Most tokens per micro-batch, text and image tokens together (padding included when padded); unset:
    no token cap (padded), micro_batch_size x the longest sample (packed). With `checkpoint_fraction = "auto"`
    on a GPU, the most: where layers would be recomputed whole within it, the first update halves it (never
    below model.max_model_len) while that spares full layers, and says so (vlrl/activation_memory.py)."""
    micro_batch_patches: int | None = Field(None, gt=0)
    """Most vision patches (rows of pixel_values and pixel_values_videos) per micro-batch: the vision tower's
    share of the budget; unset: no patch cap."""
    precision: Literal["auto", "float32", "bf16"] = "auto"
    """Training precision: `auto` is bf16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    checkpoint_fraction: Literal["auto"] | Annotated[float, Field(gt=0, le=1)] = 1.0
    """With gradient checkpointing, the fraction of decoder layers recomputed (the bottom ones); below 1
    keeps more activations and recomputes less. `auto` (GPU): the fastest mix of layers recomputed whole,
    recomputed selectively (matrix products kept, elementwise ops recomputed) and keeping everything, and whether
    the logprob head keeps its logits, whose peak fits the device's memory, measured at the first update with the
    step's gradients allocated and bounded at `micro_batch_tokens` (which it halves where that spares layers
    recomputed whole; vlrl/activation_memory.py); stepped up after an out-of-memory error (one process); on the
    CPU, every layer."""
    offload_optimizer: Literal["auto"] | bool = False
    """Keep part of AdamW's moments (at most the gradients' bytes: 15 GiB on 8B) on pinned host memory between
    steps, copied to the GPU during the last backward pass and back after the optimizer step on a stream of
    their own (vlrl/optimizer_offload.py): the memory goes to activations, so `auto` checkpointing recomputes
    less. Exact (CPU tests; on the GPU, bit-equal to AdamW's own). Off by default: it pays only where memory
    is short (8B ragged batch, 8192-token micro-batches, capped at 74.5 GiB: 47.2% useful MFU against 41.5% on an
    H100, 48.2% against 42.5% on an H200; on a whole H200 it costs ~0.2 s a step, README), and its copies share
    the host link with the weight sync. `auto`: with `checkpoint_fraction = "auto"` on a GPU, one
    process or DDP, kept only where the chooser recomputes fewer layers whole with it than without (it decides
    at the first update and says so); true: on (not under FSDP2, where each rank holds a shard of the state already).
    Needs that much free host memory per process."""
    compile: bool = False
    """torch.compile each decoder layer and each vision block (regional compilation: identical layers share
    one compiled graph), and the softmax statistics of the logprob head (one fused kernel per chunk of logits,
    forward and backward). Fuses the norms, rotary embedding and activations; the first steps pay the compile
    time, and each new image size recompiles the vision blocks once."""
    seed: int = 0
    """Seed of the data order and the model's random parts."""


class CheckpointConfig(Section):
    every: int = Field(50, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted."""


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    """Evaluate on the eval split every this many training steps (0: never during training). Results go
    to `<run dir>/eval-step-N/` and into metrics.jsonl as `eval/...` keys."""
    limit: int | None = Field(None, gt=0)
    """Most eval prompts per evaluation (all of the split when unset)."""
    n: int | None = Field(None, gt=0)
    """Completions per eval prompt (for pass@k); default rollout.group_size."""


class LoggingConfig(Section):
    samples_per_step: int = Field(4, ge=0)
    """Rollouts per step written to `samples.jsonl` (with image references)."""
    progress: bool = True
    """Show a progress bar."""
    trackers: list[Literal["tensorboard", "wandb"]] = []
    """Also log the metrics through Accelerate's trackers (none by default, so no network is needed):
    `tensorboard` writes event files under the run directory; `wandb` needs `wandb login` (or
    WANDB_MODE=offline)."""
    project: str = "vlrl"
    """Tracker project name (the W&B project); the run is named after `name`."""


class Config(Section):
    name: str = "run"
    """Run name: outputs go to `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Directory that holds runs."""
    model: ModelConfig = ModelConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        if self.model.min_pixels > self.model.max_pixels:
            raise ValueError(
                f"model.min_pixels ({self.model.min_pixels}) is larger than model.max_pixels "
                f"({self.model.max_pixels})"
            )
        if self.model.video_min_frames > self.model.video_max_frames:
            raise ValueError(f"model.video_min_frames ({self.model.video_min_frames}) is larger than "
                             f"model.video_max_frames ({self.model.video_max_frames})")
        if self.model.video_min_pixels > self.model.video_max_pixels:
            raise ValueError(f"model.video_min_pixels ({self.model.video_min_pixels}) is larger than "
                             f"model.video_max_pixels ({self.model.video_max_pixels})")
        if self.rollout.server_url and self.model.max_videos_per_prompt > 1:
            raise ValueError(
                f"model.max_videos_per_prompt ({self.model.max_videos_per_prompt}) must be at most 1 with a "
                "vLLM server: vLLM 0.32 takes one list of frame timestamps per request (media_io_kwargs)"
            )
        if self.rollout.max_new_tokens >= self.model.max_model_len:
            raise ValueError(
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for the prompt in "
                f"model.max_model_len ({self.model.max_model_len})"
            )
        if self.rollout.max_off_policy_steps and not self.rollout.server_url:
            raise ValueError("rollout.max_off_policy_steps > 0 needs rollout.server_url (a vLLM server): the "
                             "in-process sampler generates with the model the learner is updating")
        if self.train.checkpoint_fraction == "auto" and not self.train.gradient_checkpointing:
            raise ValueError('train.checkpoint_fraction = "auto" needs train.gradient_checkpointing = true')
        if (self.train.micro_batch_tokens is not None
                and self.train.micro_batch_tokens < self.model.max_model_len):
            raise ValueError(
                f"train.micro_batch_tokens ({self.train.micro_batch_tokens}) is below model.max_model_len "
                f"({self.model.max_model_len}): a full-length sample would not fit in any micro-batch"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value). The value is read as a TOML value, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rollout.group_size=16")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config, apply `--set` overrides, validate. Errors name the file and the key path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    apply_overrides(data, overrides or [])
    source = str(p) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (every default filled in) as TOML that `load_config` reads back."""
    import tomli_w

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    return p
