"""The embedded rollout backend: the policy samples its own completions in process (transformers `generate`).

This is the default when no vLLM server is configured, so `vlrl train configs/tiny-cpu.toml` runs anywhere.
The logprob of each sampled token is read from the scores `generate` actually sampled from (after
temperature, top-k/top-p and the placeholder ban), so it is the behavior logprob the loss needs.
Every sampling parameter is set explicitly: a checkpoint's `generation_config.json` (Qwen3-VL ships
top_k=20, top_p=0.8, temperature=0.7) never silently changes what the config asked for.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import RolloutConfig
from ..records import EncodedPrompt, Rollout


class EmbeddedSampler:
    """Samples `n` completions per prompt with the policy model itself."""

    def __init__(self, model, adapter, cfg: RolloutConfig, max_prompts_per_call: int = 16,
                 static_cache: bool | None = None):
        self.model = model
        self.adapter = adapter
        self.tokenizer = adapter.tokenizer
        self.eos_token_ids = list(adapter.eos_token_ids)
        self.max_new_tokens = cfg.max_new_tokens
        self.temperature = cfg.temperature
        self.top_p = cfg.top_p
        self.top_k = cfg.top_k
        self.max_prompts_per_call = max_prompts_per_call
        self.static_cache = cfg.static_cache if static_cache is None else static_cache

    def generation_config(self, n: int, max_new_tokens: int | None = None, stop_ids: list[int] | None = None):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True,
            num_return_sequences=n,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),  # 0 disables top-k
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            suppress_tokens=self.adapter.banned_token_ids,
            eos_token_id=stop_ids or self.eos_token_ids,
            pad_token_id=self.adapter.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            # transformers compiles the decoding step for a static cache on CUDA
            cache_implementation="static" if self.static_cache else None,
        )

    @torch.no_grad()
    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` rollouts per prompt, prompt-major (group g holds rollouts g*n ... g*n+n-1). With a `seed` the
        same seed, weights and prompts give the same rollouts (the global RNG is restored afterwards)."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rng_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            out: list[Rollout] = []
            for start in range(0, len(prompts), self.max_prompts_per_call):
                chunk = prompts[start : start + self.max_prompts_per_call]
                out.extend(self._sample_chunk(chunk, n, start, device))
            return out
        finally:
            if seed is not None:
                torch.random.set_rng_state(rng_state)
            self.model.train(was_training)

    def _sample_chunk(self, prompts: list[EncodedPrompt], n: int, first_group: int, device) -> list[Rollout]:
        """One `generate` call for several prompts: left-padded, each repeated `n` times (prompt-major). A prompt
        with a budget of its own (`max_new_tokens`, a late turn) keeps the first tokens of its sample within it:
        a sample cut at k tokens is a sample drawn with max_new_tokens = k.

        The prompts are repeated here, each with its own copy of its images' patches, rather than by
        `num_return_sequences`: transformers expands every input row by row, and for a model without its own
        expansion of `pixel_values` (Qwen3.5 in transformers 5.19) that repeats each patch n times in place,
        scrambling the image (measured: mismatch KL 2e-4 against the trainer from the first sampled token, on
        any image whose patches differ; a one-colour image hides it)."""
        inputs = self.adapter.generation_inputs([p for p in prompts for _ in range(n)], device)
        budgets = [min(self.max_new_tokens, p.max_new_tokens or self.max_new_tokens) for p in prompts]
        stops = sorted(set(self.eos_token_ids).union(*(p.stop_token_ids for p in prompts)))
        # (a mixture-of-experts model records the experts it routes each token to: routing replay)
        capture = getattr(self.adapter, "capture_routing", None)  # (Adapter.capture_routing)
        with capture(self.model) if capture is not None else nullcontext() as routing:
            res = self.model.generate(**inputs, generation_config=self.generation_config(1, max(budgets), stops))
        width = inputs["input_ids"].shape[1]
        routed = None if routing is None else routing.rows(res.sequences.shape[0])  # [P*n, S, layers, k]
        new_tokens = res.sequences[:, width:]  # [P*n, T]
        scores = torch.stack(res.scores, dim=1).float()  # [P*n, T, V]: the processed scores sampled from
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)  # [P*n, T]
        rollouts = []
        for row in range(new_tokens.shape[0]):
            g = row // n
            toks = new_tokens[row].tolist()[: budgets[g]]
            end = next((j for j, t in enumerate(toks) if t in stops), None)
            stop = end is not None
            toks = toks[: end + 1] if stop else toks
            p = len(prompts[g].input_ids)
            # the prompt's tokens and the sampled ones but the last (never fed back): n - 1 rows
            experts = None if routed is None else routed[row, width - p : width + len(toks) - 1].clone()
            rollouts.append(
                Rollout(
                    prompt=prompts[g],
                    completion_ids=toks,
                    logprobs=logprobs[row, : len(toks)].tolist(),
                    finish_reason="stop" if stop else "length",
                    text=self.adapter.completion_text(toks),
                    group=first_group + g,
                    routed_experts=experts,
                )
            )
        return rollouts

    def sync_weights(self, model) -> None:
        """Nothing to send: the embedded sampler samples with the training model itself."""
        self.model = model
