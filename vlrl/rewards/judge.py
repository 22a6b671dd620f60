"""The `judge` reward: an LLM grades each completion through any OpenAI-compatible chat API.

Set up per reward, in the run's config (every field in `vlrl/config.py`'s `JudgeConfig`):

    [[env.rewards]]
    fn = "judge"
    [env.rewards.judge]
    base_url = "http://127.0.0.1:8001/v1"     # e.g. a second `vlrl serve --port 8001`
    score_pattern = '(?i)score\\s*[:=]\\s*(\\d+)'
    max_score = 10

Each completion becomes one chat request (the template filled with the question, the reference answer and the
completion), all of a batch in flight together up to `max_concurrency`, each under `timeout_s` with retries
and backoff on transient failures. The reply's last match of `score_pattern` divided by `max_score` is the
reward. A reply without a score is the reward failure `unparseable`; a request that never succeeded is
`judge_failed`: both are counted, named in the step's errors and left out of the group baseline, and never
stop the run.
"""

from __future__ import annotations

import asyncio
import os
import re

from ..config import JudgeConfig
from ..sample import Sample
from .base import Outcome
from .builtin import answer_part


class JudgeFailed(Exception):
    """No judgement: the endpoint could not be reached or refused the request."""


def parse_score(reply: str | None, pattern: str, max_score: float) -> Outcome:
    """The reward in a judge's reply: the last match of `pattern`'s group, divided by `max_score`."""
    found = re.findall(pattern, reply or "")
    if not found:
        return (None, "unparseable",
                f"the judge's reply has no score matching {pattern!r}: {(reply or '')[-160:]!r}")
    score = float(found[-1])
    if not 0.0 <= score <= max_score:
        return None, "unparseable", f"the judge's score {found[-1]} is outside [0, {max_score:g}]"
    return score / max_score, None, ""


def judge_prompt(cfg: JudgeConfig, completion: str, sample: Sample) -> list[dict]:
    """The chat messages asking the judge about one completion."""
    answer = sample.answer
    if isinstance(answer, (list, tuple)):
        answer = " or ".join(str(a) for a in answer)
    text = cfg.template.format(question=sample.question, answer="" if answer is None else answer,
                               completion=answer_part(completion).strip() if cfg.answer_only else completion)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*system, {"role": "user", "content": text}]


class Judge:
    """Scores a batch of completions with one OpenAI-compatible endpoint; `score` never raises for a failed
    or unparseable judgement."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = cfg.model

    def score(self, completions: list[str], samples: list[Sample]) -> list[Outcome]:
        return asyncio.run(self._score(completions, samples))

    async def _score(self, completions: list[str], samples: list[Sample]) -> list[Outcome]:
        import httpx

        limit = asyncio.Semaphore(self.cfg.max_concurrency)
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s))
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
            try:
                model = self.model or await self._first_model(c)
            except JudgeFailed as e:
                return [(None, "judge_failed", str(e))] * len(samples)

            async def one(completion: str, sample: Sample) -> Outcome:
                body = {"model": model, "messages": judge_prompt(self.cfg, completion, sample),
                        "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                        **self.cfg.extra_body}
                async with limit:
                    try:
                        reply = await self._post(c, body)
                    except JudgeFailed as e:
                        return None, "judge_failed", str(e)
                return parse_score(reply, self.cfg.score_pattern, self.cfg.max_score)

            return list(await asyncio.gather(*(one(x, s) for x, s in zip(completions, samples))))

    async def _first_model(self, client) -> str:
        import httpx

        try:
            r = await client.get(f"{self.url}/models", headers=self.headers)
            if r.status_code == 200:
                self.model = r.json()["data"][0]["id"]
                return self.model
            reason = f"HTTP {r.status_code}: {r.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            reason = f"{type(e).__name__}: {e}"
        raise JudgeFailed(f"the judge at {self.url} did not list its models ({reason}); check base_url, or "
                          "set model in [env.rewards.judge]")

    async def _post(self, client, body: dict) -> str | None:
        """The reply text, retrying transient failures with exponential backoff."""
        import httpx

        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = await client.post(f"{self.url}/chat/completions", json=body, headers=self.headers)
                if r.status_code == 200:
                    return r.json()["choices"][0]["message"].get("content")
                reason = f"HTTP {r.status_code}: {r.text[:200]}"
                # the request itself is wrong: no retry helps
                if r.status_code < 500 and r.status_code != 429:
                    raise JudgeFailed(f"the judge at {self.url} refused the request ({reason})")
            except (httpx.TransportError, httpx.TimeoutException) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise JudgeFailed(f"the judge at {self.url} sent an answer that is not a chat completion "
                                  f"({e})") from None
            if attempt == self.cfg.max_retries:
                raise JudgeFailed(f"the judge at {self.url} failed {attempt + 1} times ({reason})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")
