"""Everything vlrl knows about Qwen3-VL: images, chat formatting, the processor, image-token accounting,
`mm_token_type_ids`, the training batch and the policy's logprob forward. Nothing else imports model classes.

Image tokens: an image resized to (H, W) pixels becomes a grid of t*h*w patches (t = 1 for an image,
h = H / patch, w = W / patch), i.e. t*h*w rows of `pixel_values` (3 * temporal_patch * patch^2 columns: 1536
for patch 16), and t*h*w / merge^2 `<|image_pad|>` placeholders in the token sequence. A video of F sampled
frames is a grid of t = ceil(F / 2) frame pairs (`pixel_values_videos`, `video_grid_thw`); the processor
writes each pair as `<T seconds><|vision_start|>` + h*w / merge^2 `<|video_pad|>` + `<|vision_end|>`
(video.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algo.logprobs import sequence_logprobs
from ..batch import MultimodalBatch
from ..config import ModelConfig
from ..errors import UserError
from ..records import EncodedPrompt, EnvReply, Rollout
from .hub import ModelError
from .images import ImageLimits, decode_image, describe_source, fit_image, resolve_source, to_rgb
from .mrope import mrope_positions
from .packing import packed_sequences, packing_unavailable
from .patches import patch_model
from .video import FramePolicy, Video, VideoLimits, load_video

# The modules FSDP2 shards as units (every decoder layer and vision block); =
# fsdp_transformer_layer_cls_to_wrap in configs/accelerate/fsdp2-*.yaml.
FSDP_UNITS = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")


class PromptError(UserError):
    """A prompt that cannot be trained on (too many images, too long); the message names the sample."""


class Qwen3VLAdapter:
    """Turns dataset samples into encoded prompts and rollouts into training batches, for Qwen3-VL."""

    family = "Qwen3-VL"  # (in messages)
    fsdp_units = FSDP_UNITS
    lora_targets: list[str] | None = None  # LoRA's default modules (None: attention and MLP projections)
    END_OF_TURN = "<|im_end|>"

    def __init__(self, processor: Any, cfg: ModelConfig):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cfg = cfg
        self.limits = ImageLimits(cfg.image_max_bytes, cfg.image_max_decoded_pixels,
                                  cfg.image_fetch_timeout_s)
        self.video_limits = VideoLimits(cfg.video_max_bytes, cfg.video_max_decoded_pixels,
                                        cfg.video_max_duration_s,
                                        cfg.image_fetch_timeout_s, cfg.video_decode_timeout_s)
        vp = getattr(processor, "video_processor", None)
        self.frame_policy = None if vp is None else FramePolicy.from_config(cfg, vp)
        ip = processor.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.factor = self.patch_size * self.merge_size
        tok = self.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
        self.pad_token_id = (tok.pad_token_id if tok.pad_token_id is not None
                             else tok.convert_tokens_to_ids("<|endoftext|>"))
        self.eos_token_ids = sorted(
            {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None, tok.unk_token_id}
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Qwen3VLAdapter:
        from transformers import AutoProcessor

        from .hub import load_local_first

        try:
            processor = load_local_first(
                lambda p, **kw: AutoProcessor.from_pretrained(
                    p, trust_remote_code=cfg.trust_remote_code, **kw),
                cfg.path, "processor", ModelError)
        except OSError as e:
            raise ModelError(f"model.path {cfg.path!r}: cannot load its processor ({e})") from None
        if not hasattr(processor, "image_processor") or not hasattr(processor.image_processor, "merge_size"):
            raise ModelError(f"model.path {cfg.path!r} does not hold a {cls.family} processor")
        return cls(processor, cfg)

    # --- tokens the sampler must never produce ------------------------------------------------------------
    @property
    def banned_token_ids(self) -> list[int]:
        """Placeholder tokens: a sampled `<|image_pad|>` would crash the next forward (no image behind it)."""
        return [self.image_token_id, self.video_token_id]

    # --- images and messages ----------------------------------------------------------------------------
    def load_image(self, source: Any, base_dir: Path | None = None):
        """Any supported source -> RGB PIL image resized to the pixel policy."""
        img = decode_image(source, base_dir, self.limits)
        return fit_image(img, self.cfg.min_pixels, self.cfg.max_pixels, self.factor,
                         resolve_source(source, base_dir))

    def load_video(self, source: Any, base_dir: Path | None = None) -> Video:
        """A video file or a list of frames -> its frames under the frame policy (sampled, resized)."""
        if self.frame_policy is None:
            raise PromptError(f"model.path {self.cfg.path!r}: its processor has no video processor")
        return load_video(source, base_dir, self.video_limits, self.frame_policy, self.limits)

    @staticmethod
    def build_messages(
        question: str, num_images: int, system_prompt: str | None = None, history: list[dict] | None = None,
        image_marker: str | None = None, num_videos: int = 0,
    ) -> list[dict]:
        """A chat: optional system prompt, earlier turns, then a user turn with its images first, then its
        videos, then text.

        A question holding `image_marker`s (LLaVA / EasyR1 style: geometry3k's "<image>Find x.") gets its
        images where the markers are, in order, the markers removed; a leading marker gives the usual
        images-first turn.
        """
        messages: list[dict] = []
        if system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        messages.extend(history or [])
        videos = [{"type": "video"} for _ in range(num_videos)]
        if image_marker and image_marker in question:
            pieces = question.split(image_marker)
            if len(pieces) - 1 != num_images:
                raise PromptError(
                    f"the question holds {len(pieces) - 1} {image_marker} image marker(s) but the sample has "
                    f"{num_images} image(s); fix the row, or set env.image_marker = \"\" to keep markers as "
                    "text"
                )
            content = []
            for k, piece in enumerate(pieces):
                if piece:
                    content.append({"type": "text", "text": piece})
                if k < num_images:
                    content.append({"type": "image"})
            content = videos + content  # (videos have no markers: they open the turn)
        else:
            content = [{"type": "image"}
                       for _ in range(num_images)] + videos + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        return messages

    def encode_prompt(
        self, messages: list[dict], image_sources: list[Any], base_dir: Path | None = None,
        name: str = "prompt",
        video_sources: list[Any] = (),
        tools: list[dict] | None = None,
    ) -> EncodedPrompt:
        """Tokenise a chat with its images and videos through the processor; check placeholders against the
        grids.

        `messages` mark each image with an `{"type": "image"}` part, in the order of `image_sources`, and each
        video with a `{"type": "video"}` part, in the order of `video_sources`; `tools` (function schemas) go
        into the system turn as the chat template writes them.
        """
        for kind, sources, limit in (("image", image_sources, "max_images_per_prompt"),
                                     ("video", video_sources, "max_videos_per_prompt")):
            n_parts = sum(
                1 for m in messages if isinstance(m["content"], list) for p in m["content"]
                if p.get("type") == kind
            )
            if n_parts != len(sources):
                raise PromptError(f"{name}: the messages hold {n_parts} {kind} parts but {len(sources)} "
                                  f"{kind}s")
            if len(sources) > getattr(self.cfg, limit):
                raise PromptError(
                    f"{name}: {len(sources)} {kind}s is over model.{limit} ({getattr(self.cfg, limit)}); "
                    f"raise it (and the server's --limit-mm-per-prompt {kind}=N) or drop {kind}s"
                )
        images = [self.load_image(s, base_dir) for s in image_sources]
        videos = [self.load_video(s, base_dir) for s in video_sources]
        text = self.processor.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        enc = self._tokenize(text, images, videos)
        ids = enc["input_ids"][0].tolist()
        grid, video_grid = enc.get("image_grid_thw"), enc.get("video_grid_thw")
        prompt = EncodedPrompt(
            input_ids=ids,
            messages=messages,
            images=images,
            pixel_values=enc.get("pixel_values"),
            image_grid_thw=grid,
            image_refs=[describe_source(s) for s in image_sources],
            videos=videos,
            pixel_values_videos=enc.get("pixel_values_videos"),
            video_grid_thw=video_grid,
            video_refs=[v.source for v in videos],
            tools=tools or None,
        )
        if videos and (video_grid[:, 1:]
                       * self.patch_size).tolist() != [list(v.frames[0].size[::-1]) for v in videos]:
            raise RuntimeError(f"{name}: the video processor resized the frame policy's frames "
                               "(processor_video_size)")
        self.check_placeholders(ids, grid, name, video_grid)
        if len(ids) >= self.cfg.max_model_len:
            raise PromptError(
                f"{name}: the prompt is {len(ids)} tokens (images and videos included), not below "
                "model.max_model_len "
                f"({self.cfg.max_model_len}); lower model.max_pixels or model.video_max_tokens, use fewer "
                "images or videos, or raise max_model_len"
            )
        return prompt

    def _tokenize(self, text: str, images: list, videos: list[Video] = ()):
        """The processor on rendered text: ids with placeholders expanded, pixel values and grids (a
        BatchFeature), images at the pixel policy, videos as the frame policy left them."""
        kwargs: dict[str, Any] = {"images_kwargs": {"size": {"shortest_edge": self.cfg.min_pixels,
                                                              "longest_edge": self.cfg.max_pixels}}}
        if videos:
            kwargs.update(videos=[v.array() for v in videos], videos_kwargs=self._videos_kwargs(videos))
        return self.processor(text=[text], images=images or None, return_tensors="pt", **kwargs)

    def _videos_kwargs(self, videos: list[Video]) -> dict[str, Any]:
        """The video processor's settings: the frames are already sampled (`do_sample_frames` off, their
        indices and rate in the metadata write the timestamps) and already resized (its own resize keeps
        them)."""
        from transformers.video_utils import VideoMetadata

        out = {"video_metadata": [VideoMetadata(**v.metadata()) for v in videos], "do_sample_frames": False,
               "size": self.frame_policy.processor_size}
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):  # transformers >= 5.19
            out["cap_pixels_per_frame"] = False  # (its per-frame cap could shrink the policy's frames)
        return out

    def completion_text(self, ids: list[int]) -> str:
        """The text of sampled ids, as every sampler reports it: decoded here from the ids, special tokens
        (`<|im_end|>`) left out, tags that are plain added tokens (`<tool_call>`, `</tool_call>`, `<think>`)
        kept as the model wrote them. A server's own text is never used: vLLM leaves a stop token's text out
        (a turn stopped at `</tool_call>` would lose it) and a server started with a tool or reasoning parser
        moves text out of the message."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def tool_call_end_ids(self) -> list[int]:
        """Tokens whose text ends a tool call (`</tool_call>`; a tokenizer may hold whole calls as one
        token)."""
        return sorted(i for t, i in self.tokenizer.get_added_vocab().items() if t.endswith("</tool_call>"))

    def encode_reply(self, messages: list[dict], images: list, name: str = "reply", close_turn: bool = False
                     ) -> EnvReply:
        """An environment's reply (tool/user messages; image parts in the order of `images`) rendered once by
        the chat template, as the ids that follow a sampled assistant turn: the line break after its
        `<|im_end|>`, the messages, and the next `<|im_start|>assistant\n` (`close_turn`: the `<|im_end|>`
        too, for a turn the sampler stopped at its tool call). Rendered after a stand-in assistant turn and
        cut after it, so the earlier turns are never rendered (or tokenised) again; the template's own rules
        (tool results grouped into one user turn) apply as they would to the whole chat."""
        images = [fit_image(to_rgb(img), self.cfg.min_pixels, self.cfg.max_pixels, self.factor,
                            f"{name} image")
                  for img in images]
        # (a user turn first: Qwen3.5's template refuses a chat without one)
        before = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
        head = self.processor.apply_chat_template(before, tokenize=False, add_generation_prompt=False)
        whole = self.processor.apply_chat_template(before + messages, tokenize=False,
                                                   add_generation_prompt=True)
        end = head.rfind(self.END_OF_TURN)
        if end < 0 or not whole.startswith(head):
            raise PromptError(f"{name}: the chat template does not end an assistant turn with "
                              f"{self.END_OF_TURN}; multi-turn rollouts need its family's own template")
        enc = self._tokenize(whole[end if close_turn else end + len(self.END_OF_TURN) :], images)
        ids = enc["input_ids"][0].tolist()
        pixel_values, grid = enc.get("pixel_values"), enc.get("image_grid_thw")
        self.check_placeholders(ids, grid, name)
        return EnvReply(input_ids=ids, images=images, pixel_values=pixel_values, image_grid_thw=grid)

    def placeholders_per_image(self, grid: torch.Tensor | None) -> list[int]:
        """Placeholder tokens of each image (or video) of a [n, 3] grid: t*h*w / merge^2."""
        if grid is None:
            return []
        return (grid.prod(-1) // (self.merge_size**2)).tolist()

    def check_placeholders(self, ids: list[int], grid: torch.Tensor | None, name: str,
                           video_grid: torch.Tensor | None = None) -> None:
        for token_id, token, kind, g in ((self.image_token_id, "<|image_pad|>", "image", grid),
                                         (self.video_token_id, "<|video_pad|>", "video", video_grid)):
            found = sum(1 for t in ids if t == token_id)
            expected = sum(self.placeholders_per_image(g))
            if found != expected:
                raise PromptError(
                    f"{name}: {found} {token} tokens but the {kind} grid needs {expected}; "
                    "the chat template and the processor disagree"
                )

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int64: 0 text, 1 image placeholder, 2 video placeholder (transformers needs it for
        M-RoPE)."""
        out = torch.zeros_like(input_ids)
        out[input_ids == self.image_token_id] = 1
        out[input_ids == self.video_token_id] = 2
        return out

    def generation_inputs(self, prompts: list[EncodedPrompt],
                          device: torch.device | str) -> dict[str, torch.Tensor]:
        """Model inputs of several prompts for `generate`: left-padded, images packed in prompt order."""
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [P, W]
        mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [P, W]
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[i, width - len(p.input_ids) :] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": self.mm_token_type_ids(ids)}
        with_images = [p for p in prompts if p.image_grid_thw is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images])  # [P_img, D]
            inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])  # [n_images, 3]
        with_videos = [p for p in prompts if p.video_grid_thw is not None]
        if with_videos:
            inputs["pixel_values_videos"] = torch.cat([p.pixel_values_videos
                                                       for p in with_videos])  # [P_vid, D]
            inputs["video_grid_thw"] = torch.cat([p.video_grid_thw for p in with_videos])  # [n_videos, 3]
        return {k: v.to(device) for k, v in inputs.items()}

    def empty_rollout(self) -> Rollout:
        """A two-token text rollout with nothing to train: it keeps a rank with no rollouts in step."""
        prompt = EncodedPrompt(input_ids=[self.pad_token_id] * 2, messages=[], images=[])
        return Rollout(prompt=prompt, completion_ids=[self.pad_token_id], logprobs=[0.0],
                       finish_reason="stop",
                       completion_mask=[0])

    # --- the training batch --------------------------------------------------------------------------------
    def build_batch(self, rollouts: list[Rollout]) -> MultimodalBatch:
        """Rollouts -> one right-padded batch. loss_mask is 1 exactly on sampled completion tokens (never on
        an environment's reply); each sample's images are its prompt's, then those its environment
        returned."""
        if not rollouts:
            raise ValueError("build_batch needs at least one rollout")
        lengths = [r.length for r in rollouts]
        B, L = len(rollouts), max(lengths)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
        loss_mask = torch.zeros(B, L, dtype=torch.float32)  # [B, L]
        behavior = torch.zeros(B, L, dtype=torch.float32)  # [B, L]
        vision = [rollout_vision(r) for r in rollouts]
        for i, r in enumerate(rollouts):
            p, c = len(r.prompt.input_ids), len(r.completion_ids)
            placeholders = (self.image_token_id, self.video_token_id)
            if any(t in placeholders for t, m in zip(r.completion_ids, r.trained_mask) if m):
                # The sampler bans placeholders, so this is a sampler bug, not bad data.
                raise ValueError(f"rollout {i}: a sampled token is an image/video placeholder")
            input_ids[i, : p + c] = torch.tensor(r.prompt.input_ids + r.completion_ids, dtype=torch.long)
            attention_mask[i, : p + c] = 1
            mask = torch.tensor(r.trained_mask, dtype=torch.float32)
            loss_mask[i, p : p + c] = mask
            behavior[i, p : p + c] = torch.tensor(r.logprobs, dtype=torch.float32) * mask
            self.check_placeholders(input_ids[i, : p + c].tolist(), vision[i]["image"][1], f"rollout {i}",
                                    vision[i]["video"][1])
        model_inputs = {"mm_token_type_ids": self.mm_token_type_ids(input_ids)}
        layout = {"mm_token_type_ids": "token"}
        counts = {}
        # each kind packed over the batch (rows in token order), with the per-sample counts that slice it
        for kind, (pixels_key, grid_key, patch_layout, item_layout) in VISION_INPUTS.items():
            rows = [v[kind] for v in vision]
            counts[kind] = ([0 if g is None else int(g.prod(-1).sum()) for _, g in rows],
                            [0 if g is None else len(g) for _, g in rows])
            kept = [(pv, g) for pv, g in rows if g is not None and len(g)]
            if kept:
                model_inputs[pixels_key] = torch.cat([pv for pv, _ in kept])  # [P, D]
                model_inputs[grid_key] = torch.cat([g for _, g in kept])  # [N, 3]
                layout.update({pixels_key: patch_layout, grid_key: item_layout})
        # M-RoPE positions built here, on the host, so the model does not walk the batch on the GPU every pass
        model_inputs["position_ids"] = mrope_positions(
            input_ids, attention_mask, model_inputs.get("image_grid_thw"), self.image_token_id,
            self.merge_size,
            model_inputs.get("video_grid_thw"), self.video_token_id,
        )  # [3, B, L]
        layout["position_ids"] = "positions"
        return MultimodalBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            behavior_logprobs=behavior,
            advantages=torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
            model_inputs=model_inputs,
            layout=layout,
            patches_per_sample=counts["image"][0],
            images_per_sample=counts["image"][1],
            video_patches_per_sample=counts["video"][0],
            videos_per_sample=counts["video"][1],
        )

    # --- the model --------------------------------------------------------------------------------------
    def load_model(self, dtype: torch.dtype, device: torch.device | str = "cpu",
                   weights_from: str | None = None):
        """The HF model, from safetensors only (`weights_from`: a checkpoint directory instead of
        model.path)."""
        from transformers import AutoModelForImageTextToText

        from .hub import load_local_first

        path = weights_from or self.cfg.path
        try:
            model = load_local_first(lambda p, **kw: AutoModelForImageTextToText.from_pretrained(
                p,
                dtype=dtype,
                attn_implementation=self.cfg.attn_implementation,
                trust_remote_code=self.cfg.trust_remote_code,
                use_safetensors=True,
                **self.load_kwargs(),
                **kw,
            ), path, "weights", ModelError)
        except OSError as e:
            raise ModelError(f"model.path {path!r}: cannot load the model ({e})") from None
        # a group's copies of an image encoded once; the tower's fast path; packed sequences (patches.py)
        patch_model(model)
        return model.to(device)

    def load_kwargs(self) -> dict:
        """`from_pretrained` keywords of the family beyond the common ones (none for the dense model)."""
        return {}

    def capture_routing(self, model):
        """A context in which `generate` records the experts it routes each token to (mixture-of-experts
        families: `qwen3_vl_moe.py`); it yields None for a dense model, which routes nothing."""
        return nullcontext()

    @staticmethod
    def set_checkpointing(model, fraction: float, selective: float = 0.0) -> None:
        set_checkpointing(model, fraction, selective)

    @staticmethod
    def decoder_layers(model) -> int:
        return len(model.model.language_model.layers)

    @staticmethod
    def layer_parameters(model) -> int:
        """Parameters of a decoder layer, on average over the layers (the unit `auto` checkpointing weighs
        recomputation in; Qwen3.5's linear and full-attention layers differ)."""
        layers = model.model.language_model.layers
        return sum(p.numel() for p in layers.parameters()) // len(layers)

    @staticmethod
    def packing_unavailable(model) -> str | None:
        """Why `model` trains on padded micro-batches (one line), or None when it can pack them."""
        return packing_unavailable(model)

    def prepare_for_training(self, model, cfg, adapter_dir: Path | None = None) -> None:
        """Freeze the vision tower, add LoRA (loading its weights from `adapter_dir` on resume), and turn
        on gradient checkpointing, as the config says."""
        model.train()
        if cfg.model.freeze_vision:
            model.model.visual.requires_grad_(False)
        # ("auto" is decided at the first update: every layer until then)
        if cfg.train.gradient_checkpointing:
            fraction = cfg.train.checkpoint_fraction
            set_checkpointing(model, 1.0 if fraction == "auto" else fraction)
        if cfg.model.lora_rank > 0:
            from .lora import add_lora

            add_lora(model, cfg.model, None if adapter_dir is None else Path(adapter_dir) / "adapter",
                     self.lora_targets)
        if cfg.train.compile:
            compile_layers(model)

    def policy(self, model, temperature: float, fused_head: bool = False) -> Qwen3VLPolicy:
        return Qwen3VLPolicy(model, self.banned_token_ids, temperature, fused_head=fused_head,
                             packed_attention=self.cfg.packed_attention,
                             videos=self.cfg.max_videos_per_prompt > 0)

    @staticmethod
    def reference_positions(model, batch: MultimodalBatch) -> torch.Tensor:
        """[3, B, L] M-RoPE positions as the model itself computes them (`get_rope_index`): what check-batch
        holds the positions built with the batch against."""
        inputs = batch.model_inputs
        positions, _ = model.model.get_rope_index(
            batch.input_ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=batch.attention_mask,
        )
        return positions

    def save_pretrained(self, model, out_dir: Path, state_dict: dict | None = None) -> None:
        """An HF-format directory vLLM can serve: weights (LoRA merged in), config, processor. `state_dict`:
        the weights to write instead of the model's own (the gathered weights of an FSDP-sharded model)."""
        from .lora import has_lora, save_merged

        if state_dict is not None:
            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        elif has_lora(model):
            save_merged(model, Path(out_dir))
        else:
            model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)


# How each kind of vision input enters the batch: (pixels key, grid key, their layouts in MultimodalBatch).
VISION_INPUTS = {
    "image": ("pixel_values", "image_grid_thw", "patch", "image"),
    "video": ("pixel_values_videos", "video_grid_thw", "video_patch", "video"),
}


def rollout_vision(rollout: Rollout) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """A rollout's (pixels [P, D], grid [N, 3]) per kind, in token order: its prompt's images, then those its
    environment returned (`Rollout.pixel_values` holds both), and its prompt's videos: the one place the batch
    reads them."""
    p = rollout.prompt
    return {"image": (rollout.pixel_values, rollout.image_grid_thw),
            "video": (p.pixel_values_videos, p.video_grid_thw)}


def set_checkpointing(model, fraction: float, selective: float = 0.0) -> None:
    """Recompute `fraction` of the decoder layers whole in the backward pass and `selective` of them selectively
    (their matrix products kept: `adapters/checkpointing.py`: full at the bottom, then selective); the rest keep
    everything."""
    from .checkpointing import set_layer_checkpointing

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = model.model.language_model.layers
    n = len(layers)
    full = round(fraction * n)  # whole layers (fractions k / n are exact; 1 / 36 * 36 is not 1 in floats)
    set_layer_checkpointing(layers, full, min(round(selective * n), n - full))


def compile_layers(model) -> None:
    """Regional compilation: each decoder layer and each vision block compiled in place; identical layers
    reuse one graph. (A vision block is one graph when its images are of one size: `fast_vision`.)"""
    for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:
        layer.compile()


class Qwen3VLPolicy(nn.Module):
    """The trainable module: a Qwen3-VL model whose forward returns token-aligned logprobs.

    Wrapping the whole computation (backbone + chunked lm_head) in one module is what lets Accelerate/DDP/FSDP
    wrap it: the loss never calls a sub-module behind the wrapper's back.
    """

    def __init__(self, model: nn.Module, banned_ids: list[int], temperature: float, chunk_size: int = 1024,
                 fused_head: bool = False, packed_attention: str = "auto", videos: bool = False):
        super().__init__()
        self.model = model
        self.temperature = temperature
        # the run may hold videos: a micro-batch without them runs the tower once for them
        self.videos = videos
        self.chunk_size = chunk_size
        self.fused_head = fused_head  # compiled softmax statistics over each chunk's logits (train.compile)
        self.packed_attention = packed_attention  # the attention route of packed micro-batches (packing.py)
        self.keep_logits = False  # the logprob head keeps its logits for the backward (auto checkpointing's choice)
        device = next(model.parameters()).device
        self.register_buffer("banned_ids", torch.tensor(banned_ids, dtype=torch.long, device=device),
                             persistent=False)

    def _idle_vision_pass(self, backbone) -> torch.Tensor:
        """A micro-batch without images (or, in a run with videos, without videos) still runs the vision tower
        for them (on a 32x32 blank image) and adds 0 x its output: every rank then takes part in the tower's
        collectives (FSDP all-gathers, DDP gradient buckets) and none waits forever for a rank whose
        micro-batch had no image or no video."""
        visual = backbone.visual
        dim = visual.patch_embed.proj.weight.shape[1:].numel()  # channels * temporal_patch * patch^2
        merge = visual.spatial_merge_size
        pixels = torch.zeros(merge * merge, dim, device=self.banned_ids.device, dtype=visual.dtype)
        grid = torch.tensor([[1, merge, merge]], device=self.banned_ids.device)
        out = visual(pixels, grid_thw=grid, return_dict=True)
        feats = [out.pooler_output] + list(getattr(out, "deepstack_features", None) or [])
        return sum(f.float().sum() for f in feats) * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] int64 (packed: [1, T])
        attention_mask: torch.Tensor | None,  # [B, L] int64 (packed: None)
        logprob_mask: torch.Tensor,  # [B, L]: positions whose token logprob is returned
        # packed: [n + 1] int32 sample boundaries in the [1, T] sequence
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,  # packed: the longest sample
        **model_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logprobs [B, L] float32, entropy [B, L] float32), 0 outside logprob_mask.

        Packed (`cu_seqlens` given): the samples are one sequence [1, T] with their own M-RoPE positions in
        `position_ids` [3, 1, T]; attention stays within each sample. logprob_mask must be 0 on each sample's
        first token (its logprob would come from the previous sample's last hidden state)."""
        backbone = self.model.model  # Qwen3VLModel: vision tower + language model, no lm_head
        hidden_bias = None
        if _distributed():
            # the model calls the tower once for the images and once for the videos: every rank makes the same
            # calls
            missing = ["pixel_values"] + (["pixel_values_videos"] if self.videos else [])
            for key in missing:
                if key not in model_inputs:
                    bias = self._idle_vision_pass(backbone)
                    hidden_bias = bias if hidden_bias is None else hidden_bias + bias
        # use_cache=False: no KV cache is ever read here; building one costs memory and makes compiled layers
        # recompile on its state.
        with packed_sequences(backbone.language_model, self.packed_attention, cu_seqlens, max_seqlen):
            out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False, **model_inputs)
        hidden = out.last_hidden_state
        if hidden_bias is not None:
            hidden = hidden + hidden_bias
        weight = self.model.get_output_embeddings().weight  # [V, H]
        return sequence_logprobs(
            hidden, weight, input_ids, logprob_mask, self.temperature, self.banned_ids, self.chunk_size,
            self.fused_head, self.keep_logits,
        )


def _distributed() -> bool:
    """Data-parallel training (DDP/FSDP wrap the policy whenever a process group exists, even of one)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
