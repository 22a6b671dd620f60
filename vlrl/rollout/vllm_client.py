"""The vLLM backend: rollouts from a real vLLM server over its OpenAI-compatible chat API.

One chat request per prompt with n = group_size, `logprobs` and `return_token_ids`, under bounded
concurrency. Token in, token out: the completion ids are the server's own sampled ids, and the server's
`prompt_token_ids` must equal the adapter's (they differ when the two sides disagree on pixel limits or on
the chat template: that is an error, never silently trained on). Images travel already resized to the
pixel policy (lossless PNG), so the server's processor keeps their size. A video travels as its sampled
frames (the frame policy's, lossless PNGs in vLLM's `data:video/jpeg` frame list: vLLM's image loader reads
the format from the bytes) with their source indices and frame rate in `media_io_kwargs`, so the server writes
the same timestamps and tokens as the processor (`vlrl serve` trusts per-request media kwargs when videos are
allowed). Placeholder tokens are banned with
`bad_words`, applied before the processed logprobs, as the trainer bans them in its softmax.
Transient failures (connection lost, 5xx, 429, timeouts: a server restarting) are retried with backoff, for
the sampling and the control routes alike; 4xx answers are errors at once.

A restarted server holds the base weights. Every push tags the server's weights with a fresh version
(`/update_weight_version`, read back by `/weight_info`; a fresh vLLM reports "default"), and the sampler
checks the tag before and after sampling: rollouts from a server whose weights the trainer did not send raise
`ServerRestarted`, and the trainer pushes its weights and samples again (train.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
import uuid
from pathlib import Path

from ..config import RolloutConfig
from ..errors import UserError
from ..records import EncodedPrompt, Rollout


class ServerError(UserError):
    """The vLLM server refused a request or could not be reached; the message says which and why."""


class ServerRestarted(ServerError):
    """The server's weights are not the ones this trainer last sent (it restarted, or another trainer
    synced)."""


def transient(status: int) -> bool:
    """An answer worth retrying: the server (or a proxy before it) failing or overloaded, not refusing."""
    return status >= 500 or status == 429


def png_data_uri(img) -> str:
    return "data:image/png;base64," + _png_base64(img)


def _png_base64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def video_data_uri(video) -> str:
    """A video's sampled frames as vLLM's frame-list data URI (comma-separated base64 frames)."""
    return "data:video/jpeg;base64," + ",".join(_png_base64(f) for f in video.frames)


class VLLMClient:
    """Thin HTTP client of one vLLM server: chat completions with retries, and the RL control routes."""

    def __init__(self, base_url: str, cfg: RolloutConfig):
        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._model: str | None = None

    # --- blocking control routes ----------------------------------------------------------------------
    def _post(self, path: str, json: dict | None = None, params: dict | None = None, timeout: float = 600.0,
              retry: bool = True):
        """A control route; transient failures retried as sampling's are (`retry=False`: once, for the NCCL
        routes, whose transfer cannot be repeated against a server that lost its process group)."""
        import httpx

        r = self._request(lambda: httpx.post(f"{self.base_url}{path}", json=json, params=params,
                                             headers=self.headers,
                                             timeout=timeout), path, retry)
        is_json = r.headers.get("content-type", "").startswith("application/json")
        return r.json() if r.content and is_json else None

    def _request(self, send, path: str, retry: bool = True):
        """`send()` until it answers 200: transient failures retried with exponential backoff
        (`rollout.max_retries`, `rollout.retry_backoff_s`), anything else a ServerError at once."""
        import httpx

        delay, tries = self.cfg.retry_backoff_s, self.cfg.max_retries + 1 if retry else 1
        for attempt in range(tries):
            try:
                r = send()
                if r.status_code == 200:
                    return r
                if not transient(r.status_code):
                    raise ServerError(f"vLLM server {self.base_url}: {path} answered {r.status_code}: "
                                      f"{_error_text(r)}")
                reason = f"HTTP {r.status_code}: {_error_text(r)}"
            except (httpx.TransportError, httpx.TimeoutException) as e:
                reason = f"{type(e).__name__}: {e}"
            if attempt == tries - 1:
                raise ServerError(f"vLLM server {self.base_url}: {path} failed {attempt + 1} times "
                                  f"({reason}); is it running?")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def weight_version(self) -> str:
        """The version tag of the weights the server holds ("default" on a fresh server)."""
        import httpx

        r = self._request(lambda: httpx.get(f"{self.base_url}/weight_info",
                                            headers=self.headers, timeout=30.0),
                          "/weight_info")
        return str(r.json()["weight_version"])

    def set_weight_version(self, version: str, retry: bool = True) -> None:
        self._post("/update_weight_version", {"new_version": version}, retry=retry)

    def model_name(self) -> str:
        """The served model's name (`/v1/models`); also the first reachability check."""
        import httpx

        if self._model is None:
            try:
                r = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=10.0)
            except httpx.HTTPError as e:
                raise ServerError(
                    f"cannot reach the vLLM server at {self.base_url} ({type(e).__name__}); start it with "
                    "`vlrl serve --model ...` or fix rollout.server_url"
                ) from None
            if r.status_code == 401:
                raise ServerError(f"vLLM server {self.base_url} wants an API key: set "
                                  f"${self.cfg.api_key_env}")
            if r.status_code != 200:
                raise ServerError(f"vLLM server {self.base_url}: /v1/models answered {r.status_code}: "
                                  f"{r.text[:300]}")
            self._model = r.json()["data"][0]["id"]
        return self._model

    def pause(self) -> None:
        """Freeze every request where it is (vLLM's `keep` mode) for the swap: nothing is drained or aborted,
        so a weight sync costs generation only the swap itself (`wait` would let the longest running
        completion finish first; `abort` would lose them). The requests frozen mid-generation continue after
        `resume` under the new weights (their KV recomputed: `reset_caches`); each token keeps the logprob of
        the weights that sampled it, which is what the loss's importance ratio needs. The caches are reset
        explicitly after the swap, not by the pause: its `clear_cache` is deprecated in vLLM 0.32 and ignored
        by `keep`."""
        self._post("/pause", params={"mode": "keep", "clear_cache": "false"})

    def resume(self) -> None:
        self._post("/resume")

    def reload_weights(self, weights_path: str) -> None:
        """Swap in the weights of an HF directory; call between `pause` and `resume`, then `reset_caches`."""
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_path}})

    def reset_caches(self) -> None:
        """After new weights, while paused: the prefix cache holds KV of the old weights and the encoder cache
        vision embeddings of images seen before (a trained vision tower changes them). Reset as vLLM's own
        paused reset does it (prefix, multi-modal inputs, encoder). Not optional: vLLM 0.32's in-place reload
        clears its workers' encoder cache but not the scheduler's record of it, so without these resets the
        next request with a repeated image stopped the engine ("Encoder cache miss")."""
        # requests frozen mid-generation hold KV blocks of the old weights: preempted, so vLLM recomputes
        # their KV (prompt and tokens so far) with the new weights when they resume
        answer = self._post("/reset_prefix_cache", params={"reset_running_requests": "true"})
        if isinstance(answer, dict) and answer.get("success") is False:
            raise ServerError(f"vLLM server {self.base_url}: /reset_prefix_cache failed after a weight swap; "
                              "the KV cache would mix two policies")
        self._post("/reset_mm_cache")
        self._post("/reset_encoder_cache")

    # vLLM's weight-sync client protocol (VLLMWeightSyncClient), used by its NCCL trainer engine
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info}, retry=False)

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._post("/start_weight_update", retry=False)

    def update_weights(self, update_info) -> None:
        self._post("/update_weights", {"update_info": update_info}, retry=False)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", None if weight_version is None
                   else {"weight_version": weight_version},
                   retry=False)

    def world_size(self) -> int:
        import httpx

        r = httpx.get(f"{self.base_url}/get_world_size", headers=self.headers, timeout=30.0)
        return int(r.json()["world_size"])

    def max_model_len(self) -> int | None:
        """The served model's context length, as `/v1/models` lists it (None if it does not say)."""
        import httpx

        self.model_name()  # reachable, and the key accepted (clear errors otherwise)
        r = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=10.0)
        value = r.json()["data"][0].get("max_model_len") if r.status_code == 200 else None
        return int(value) if value is not None else None

    # --- sampling -----------------------------------------------------------------------------------------
    async def sample(self, client, path: str, body: dict, name: str) -> dict:
        """One sampling request (`path`: the chat route, or the token-in/token-out route), retried on
        transient failures with exponential backoff."""
        import httpx

        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = await client.post(f"{self.base_url}{path}", json=body, headers=self.headers)
                if r.status_code == 200:
                    return r.json()
                if r.status_code == 404 and path == TOKENS_ROUTE:
                    raise ServerError(
                        f"vLLM server {self.base_url} has no {TOKENS_ROUTE} route, which multi-turn rollouts "
                        "need (token in, token out); start it with `vlrl serve` (or vLLM's "
                        "--enable-scale-out)")
                if not transient(r.status_code):
                    raise ServerError(f"vLLM server refused {name}: HTTP {r.status_code}: {_error_text(r)}")
                reason = f"HTTP {r.status_code}: {_error_text(r)}"
            except (httpx.TransportError, httpx.TimeoutException) as e:
                reason = f"{type(e).__name__}: {e}"
            if attempt == self.cfg.max_retries:
                raise ServerError(
                    f"vLLM server {self.base_url} failed {name} {attempt + 1} times ({reason}); is it "
                    "running?"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")


def _error_text(r) -> str:
    try:
        body = r.json()
        return str(body.get("error", {}).get("message") or body.get("message") or body)[:500]
    except ValueError:
        return r.text[:500]


def routed_experts(choice: dict, tokens: int, name: str):
    """The experts a server started with `--enable-return-routed-experts` routed each token of a choice to:
    [tokens - 1, layers, k] int16 (prompt and completion; the last sampled token was never fed back), or None
    when it returned none. vLLM 0.32 sends them per choice, on the chat and the token-in/token-out routes
    alike, as base64 of a `.npy` array (uint8 up to 256 experts)."""
    data = choice.get("routed_experts")
    if data is None:
        return None
    import numpy as np
    import torch

    rows = np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)
    if rows.ndim != 3 or len(rows) != tokens - 1:
        raise ServerError(f"{name}: the server's routed experts are {rows.shape} for {tokens} tokens (expected "
                          f"[{tokens - 1}, layers, k])")
    return torch.from_numpy(rows.astype(np.int16))


CHAT_ROUTE = "/v1/chat/completions"
TOKENS_ROUTE = "/inference/v1/generate"  # vLLM's token-in/token-out route (vlrl serve turns it on)


class VLLMSampler:
    """Samples rollouts from a vLLM server; pushes updated weights to it with a weight-sync strategy.

    A prompt with chat messages goes to the chat route (the server renders and tokenises it; its prompt ids
    are checked against ours). A continuation of a multi-turn trajectory (no messages: its ids are the
    trajectory so far) goes to the token-in/token-out route as those ids, one `<|image_pad|>` per image (the
    server's processor expands it, as it would in a chat) with the trajectory's images in order; the server's
    expanded prompt ids are checked against ours every turn."""

    def __init__(self, adapter, cfg: RolloutConfig, media_dir: Path | None = None,
                 weight_sync=None, client=None):
        self.adapter = adapter
        self.cfg = cfg
        self.client = client or VLLMClient(cfg.server_url, cfg)
        self.media_dir = media_dir
        self.weight_sync = weight_sync
        self.prompts_checked = 0  # prompts whose server prompt ids were compared with the processor's
        self.requests = 0  # requests sent (one per prompt of a call): each is checked, or raises
        self.prompt_mismatches = 0  # requests whose server prompt ids differed from ours
        # the tag of our last push; None: no push yet, nothing checked
        self.weights_version: str | None = None
        self._push = None  # the push running in the background (a Future), if any
        self._pusher = None  # its thread
        # seconds of the last push that finished, from the learner's copy to the server's check
        self.push_s = 0.0
        self.push_blocking_s = 0.0  # of which the learner waited for
        self.push_wait_s = 0.0  # seconds sampling waited for pushes (summed)
        # Policy versions (the learner's step count of the weights) for asynchronous rollouts: the version on
        # the server once a push has landed, and the newest one a push has started to send. A request that
        # began under `served_version` and ended while `pushing_version` was newer may hold tokens of both.
        self.served_version = 0
        self.pushing_version = 0
        self._pushing_tag: str | None = None  # the tag a push running now sets on the server
        self.client.model_name()  # fail early and clearly when the server is unreachable

    def _image_url(self, img, prompt_id: int, k: int) -> str:
        if self.cfg.image_transport == "data_uri":
            return png_data_uri(img)
        self.media_dir.mkdir(parents=True, exist_ok=True)
        path = self.media_dir / f"prompt-{prompt_id}-{k}.png"
        img.save(path, "PNG")
        return path.resolve().as_uri()

    def sampling_params(self, prompt: EncodedPrompt, n: int) -> dict:
        """Every sampling parameter, explicitly (a server's or checkpoint's defaults never apply)."""
        cfg = self.cfg
        return {
            "n": n,
            "max_tokens": min(cfg.max_new_tokens, prompt.max_new_tokens or cfg.max_new_tokens),
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop_token_ids": sorted(set(self.adapter.eos_token_ids) | set(prompt.stop_token_ids)),
            "bad_words": [self.adapter.tokenizer.convert_ids_to_tokens(t)
                          for t in self.adapter.banned_token_ids],
        }

    def tokens_body(self, prompt: EncodedPrompt, n: int, prompt_id: int = 0) -> dict:
        """The token-in/token-out request of a continuation: its ids with each image's run of placeholders
        as one placeholder, and the images in order."""
        if prompt.videos:
            raise ServerError(f"prompt {prompt_id}: a multi-turn trajectory with a video; the "
                              "token-in/token-out "
                              "route vlrl uses for later turns takes images only (use the in-process "
                              "sampler)")
        pad = self.adapter.image_token_id
        ids = [t for i, t in enumerate(prompt.input_ids)
               if not (t == pad and i and prompt.input_ids[i - 1] == pad)]
        runs = sum(1 for t in ids if t == pad)
        if runs != len(prompt.images):
            raise ValueError(f"prompt {prompt_id}: {runs} image placeholder runs but {len(prompt.images)} "
                             "images")
        parts = [{"type": "image_url", "url": self._image_url(img, prompt_id, k)}
                 for k, img in enumerate(prompt.images)]
        return {"token_ids": ids, "content_parts": parts, "return_token_ids": True,
                "sampling_params": {**self.sampling_params(prompt, n), "logprobs": 0}}

    def request_body(self, prompt: EncodedPrompt, n: int, prompt_id: int = 0) -> dict:
        images, videos = iter(prompt.images), iter(prompt.videos)
        messages, k = [], 0
        for m in prompt.messages:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        parts.append({"type": "image_url",
                                      "image_url": {"url": self._image_url(next(images), prompt_id, k)}})
                        k += 1
                    elif part.get("type") == "video":
                        parts.append({"type": "video_url",
                                      "video_url": {"url": video_data_uri(next(videos))}})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": m["role"], "content": content})
        body = {
            "model": self.client.model_name(),
            "messages": messages,
            **self.sampling_params(prompt, n),
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if prompt.tools:
            # rendered into the system turn by the server's chat template; `tool_choice = "none"`: the server
            # parses nothing out of the reply whatever parser it was started with (vLLM 0.32 takes tools
            # without a tool_choice as "auto", which it refuses unless started with --enable-auto-tool-choice,
            # and then moves the calls out of the text). vlrl reads the calls from the sampled ids itself.
            body["tools"] = prompt.tools
            body["tool_choice"] = "none"
        if prompt.videos:
            if len(prompt.videos) > 1:
                raise ServerError(f"prompt {prompt_id}: {len(prompt.videos)} videos; a vLLM server takes one "
                                  "per prompt")
            # the frames are already sampled: all of them (num_frames -1), at the timestamps of their source
            body["media_io_kwargs"] = {"video": {**prompt.videos[0].metadata(), "num_frames": -1}}
        return body

    def to_rollouts(self, prompt: EncodedPrompt, response: dict, group: int, name: str) -> list[Rollout]:
        server_ids = response.get("prompt_token_ids")
        if server_ids is None:
            raise ServerError(f"{name}: the server did not return prompt_token_ids (vLLM >= 0.10 needed)")
        if list(server_ids) != prompt.input_ids:
            self.prompt_mismatches += 1
            first = next((i for i, (a, b) in enumerate(zip(server_ids, prompt.input_ids)) if a != b),
                         min(len(server_ids), len(prompt.input_ids)))
            raise ServerError(
                f"{name}: the server's prompt ids differ from the trainer's ({len(server_ids)} vs "
                f"{len(prompt.input_ids)} tokens, first difference at token {first}). Likely cause: the "
                "server's pixel limits or chat template differ; start it with `vlrl serve --min-pixels "
                f"{self.adapter.cfg.min_pixels} --max-pixels {self.adapter.cfg.max_pixels}"
                + (f" --video-max-pixels {self.adapter.cfg.video_max_pixels} --video-max-frames "
                   f"{self.adapter.cfg.video_max_frames}" if prompt.videos else "")
                + "` on the same model"
                + ("; a server started with --exclude-tools-when-tool-choice-none leaves the tools out of "
                   "the prompt: start it without that flag" if prompt.tools else "")
            )
        self.prompts_checked += 1
        out = []
        for choice in sorted(response["choices"], key=lambda c: c["index"]):
            ids = list(choice["token_ids"])
            lps = [c["logprob"] for c in (choice.get("logprobs") or {}).get("content") or []]
            if len(lps) != len(ids):
                raise ServerError(f"{name}: {len(ids)} token ids but {len(lps)} logprobs from the server")
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            # the text of the sampled ids, as the in-process sampler reports it (never the server's message:
            # it drops a stop token's text, and a server with a tool or reasoning parser moves text out of it)
            out.append(Rollout(prompt=prompt, completion_ids=ids, logprobs=lps, finish_reason=finish,
                               text=self.adapter.completion_text(ids), group=group,
                               routed_experts=routed_experts(choice, len(server_ids) + len(ids), name)))
        return out

    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int | None = None) -> list[Rollout]:
        """Once the trainer has pushed weights, only from a server that holds them: checked before and after,
        so a server restarted meanwhile (its requests retried to the new one) raises ServerRestarted. A push
        still running in the background is waited for first. `seed` is not used: no request is seeded (see
        `_sample`), so server rollouts are not reproducible; a resumed run repeats its prompts, not its
        completions."""
        self.wait_for_push()
        self.check_weights()
        start = self.served_version
        out = asyncio.run(self._sample(prompts, n, seed))
        self.check_weights()
        end = max(self.pushing_version, self.served_version)
        for r in out:
            r.version, r.version_end = start, end
        return out

    def check_weights(self) -> None:
        if self.weights_version is None:
            return
        now = self.client.weight_version()
        if now not in (self.weights_version, self._pushing_tag):  # (a push of ours may be landing now)
            raise ServerRestarted(f"vLLM server {self.client.base_url} holds weights {now!r}, not the "
                                  f"trainer's {self.weights_version!r} (restarted?)")

    async def _sample(self, prompts, n, seed) -> list[Rollout]:
        import httpx

        limit = asyncio.Semaphore(self.cfg.max_concurrency)
        timeout = httpx.Timeout(self.cfg.request_timeout_s, connect=10.0)

        async def one(client, g, prompt):
            async with limit:
                name = f"prompt {g}"
                self.requests += 1
                # No per-request seed: vLLM's CPU backend crashes on seeded requests ("CPU Generator does not
                # use offset"), and batched GPU sampling is not bit-reproducible anyway.
                if prompt.messages is None:
                    path, body = TOKENS_ROUTE, self.tokens_body(prompt, n, g)
                else:
                    path, body = CHAT_ROUTE, self.request_body(prompt, n, g)
                return self.to_rollouts(prompt, await self.client.sample(client, path, body, name), g, name)

        async with httpx.AsyncClient(timeout=timeout,
                                     limits=httpx.Limits(max_connections=self.cfg.max_concurrency)) as c:
            groups = await asyncio.gather(*(one(c, g, p) for g, p in enumerate(prompts)))
        return [r for group in groups for r in group]

    def check_max_model_len(self, max_model_len: int) -> None:
        """Refuse a model.max_model_len above the server's: a trajectory longer than the server's context
        would otherwise surface mid-run as an HTTP 400."""
        served = self.client.max_model_len()
        if served is not None and max_model_len > served:
            raise ServerError(
                f"model.max_model_len ({max_model_len}) is above the vLLM server's max_model_len ({served}) "
                "at "
                f"{self.client.base_url}; lower model.max_model_len to {served} or less, or restart the "
                f"server with `vlrl serve --max-model-len {max_model_len}`"
            )

    def sync_weights(self, model, state: dict | None = None, background: bool = True,
                     version: int | None = None) -> None:
        """Send `model`'s weights (or `state`, weights gathered from an FSDP-sharded model) to the server,
        tagged with a fresh version. With the disk sync this returns once the weights are copied to host
        buffers (the learner may change them then); the files, the server's reload and the version check run
        in the background (`background=False`: here), and the next `sample` waits for them, so nothing is
        sampled from weights other than the pushed ones. Errors of a background push are raised by the next
        `sample` or sync. `version`: the learner's step count of these weights (what rollouts record)."""
        if self.weight_sync is None:
            return
        self.wait_for_push()
        self._push = None
        version = self.pushing_version if version is None else version
        self.pushing_version = version
        t0 = time.perf_counter()
        if not hasattr(self.weight_sync, "copy"):  # the NCCL route: one synchronous push
            self._tagged(lambda full: self.weight_sync.push(model, state))
            self.push_blocking_s = self.push_s = time.perf_counter() - t0
            return
        self.weight_sync.copy(model, state)
        self.push_blocking_s = time.perf_counter() - t0
        if not background:
            self._deliver(t0)
            return
        if self._pusher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrl-weight-push")
        self._push = self._pusher.submit(self._deliver, t0)

    def _deliver(self, t0: float) -> None:
        self.weight_sync.write()
        self._tagged(self.weight_sync.load)
        self.push_s = time.perf_counter() - t0

    def _tagged(self, load) -> None:
        """`load(full)` under a fresh version tag. The tag goes first and is read back last: a server
        restarted in between reports "default", and the push is made again. `full` (every tensor reloaded, not
        only the ones a step changes) when the server does not hold our last push: read just before the tag is
        set, which is sent once (not retried), so a server that restarts between the two (its start takes tens
        of seconds) makes the tag fail and the push start over."""
        delay = self.cfg.retry_backoff_s
        for _ in range(self.cfg.max_retries + 1):
            full = self.client.weight_version() != self.weights_version
            version = f"vlrl-{uuid.uuid4().hex[:16]}"
            self._pushing_tag = version  # before the server shows it: a concurrent check accepts it
            try:
                self.client.set_weight_version(version, retry=False)
            except ServerError:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            load(full)
            if self.client.weight_version() == version:
                self.weights_version = version
                self.served_version = self.pushing_version
                self._pushing_tag = None
                return
        raise ServerError(f"vLLM server {self.client.base_url} lost the weights pushed to it "
                          f"{self.cfg.max_retries + 1} times in a row (restarting over and over?)")

    def wait_for_push(self) -> None:
        """Until the last push is on the server (its error raised here). Asynchronous rollouts call it from the
        producer's threads while the learner may start the next push: only `sync_weights` forgets a push."""
        push = self._push
        if push is not None:
            t0 = time.perf_counter()
            try:
                push.result()
            finally:
                self.push_wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the last push (its error raised), then free the sync's buffers (and a shared-memory sync
        dir)."""
        try:
            self.wait_for_push()
        finally:
            if self._pusher is not None:
                self._pusher.shutdown(wait=True)
                self._pusher = None
            if hasattr(self.weight_sync, "close"):
                self.weight_sync.close()
