"""The LLM judge without a model: its parser on fixed replies, its prompt, its settings, and its requests
against a scripted local endpoint (retries, refusals, concurrency). tests/test_vllm_serving.py judges with a
real vLLM."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlrl.config import ConfigError, JudgeConfig, RewardSpec, load_config
from vlrl.rewards.judge import judge_prompt, parse_score
from vlrl.rewards.reward_set import RewardSet
from vlrl.sample import Sample

PATTERN = JudgeConfig(base_url="x").score_pattern


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("The answer matches.\nScore: 10", (1.0, None)),
        ("score = 7", (0.7, None)),
        ("Score: **4**", (0.4, None)),
        ("Score: 2 at first... on reflection, Score: 8", (0.8, None)),  # the last verdict counts
        ("SCORE:3.5", (0.35, None)),
        ("Looks right to me.", (None, "unparseable")),
        ("", (None, "unparseable")),
        (None, (None, "unparseable")),  # a reply with no content
        ("Score: 12", (None, "unparseable")),  # outside [0, max_score]
        ("Score: -1", (None, "unparseable")),
    ],
)
def test_parse_score_on_fixed_replies(reply, expected):
    value, reason, detail = parse_score(reply, PATTERN, 10.0)
    assert (value, reason) == expected
    assert (reason is None) == (detail == "")


def test_parse_score_detail_names_the_pattern_and_the_reply():
    _, _, detail = parse_score("I cannot decide.", r"VERDICT=(\d)", 1.0)
    assert detail == "the judge's reply has no score matching 'VERDICT=(\\\\d)': 'I cannot decide.'"
    assert parse_score("VERDICT=1", r"VERDICT=(\d)", 1.0) == (1.0, None, "")


def test_prompt_holds_question_answer_and_only_the_answer_part():
    cfg = JudgeConfig(base_url="x", template="Q={question} A={answer} C={completion} {{literal}}",
                      system_prompt="Be fair.")
    s = Sample(id="1", question="2+2?", answer=["4", "four"])
    msgs = judge_prompt(cfg, "<think>maybe 5</think> 4", s)
    assert msgs == [{"role": "system", "content": "Be fair."},
                    {"role": "user", "content": "Q=2+2? A=4 or four C=4 {literal}"}]
    whole = judge_prompt(cfg.model_copy(update={"answer_only": False, "system_prompt": None}),
                         "<think>5</think>4", s)
    assert whole == [{"role": "user", "content": "Q=2+2? A=4 or four C=<think>5</think>4 {literal}"}]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"template": "grade {reply}"},
         r"template: .*uses \{reply\}: only \{question\}, \{answer\} and \{completion\}"),
        ({"template": "grade {question}"}, r"template: must contain \{completion\}"),
        ({"template": "grade {completion"}, r"template: is not a valid template"),
        ({"score_pattern": r"score (\d)/(\d)"},
         r"score_pattern: must have exactly one group, the score \(it has 2\)"),
        ({"score_pattern": r"score (\d"}, r"score_pattern: is not a regular expression"),
        ({"max_score": 0}, r"max_score"),
        ({"api_key": "sk-123"}, r"api_key: unknown key"),  # keys come from the environment only
    ],
)
def test_judge_settings_are_checked_when_the_config_loads(tmp_path, fields, message):
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    p = tmp_path / "run.toml"
    p.write_text('[[env.rewards]]\nfn = "judge"\n[env.rewards.judge]\nbase_url = '
                 f'"http://127.0.0.1:9/v1"\n{lines}')
    with pytest.raises(ConfigError, match=r"env\.rewards\.0\.judge\." + message):
        load_config(p)


def test_judge_settings_belong_to_the_judge(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[[env.rewards]]\nfn = "judge"\n')
    with pytest.raises(ConfigError,
                       match=r'env\.rewards\.0: .*fn = "judge" needs its settings: add '
                             r'\[env\.rewards\.judge\]'):
        load_config(p)
    p.write_text('[[env.rewards]]\nfn = "math"\n[env.rewards.judge]\nbase_url = "http://x/v1"\n')
    with pytest.raises(ConfigError, match=r"judge settings given for fn = 'math'"):
        load_config(p)
    p.write_text('[[env.rewards]]\nfn = "judge"\nweight = 0.5\n[env.rewards.judge]\nbase_url = '
                 '"http://x/v1"\n'
                 'extra_body = {structured_outputs = {regex = "Score: [0-9]"}}\n[[env.rewards]]\nfn = '
                 '"format"\n')
    cfg = load_config(p)
    assert cfg.env.rewards[0].judge.extra_body == {"structured_outputs": {"regex": "Score: [0-9]"}}
    assert cfg.env.rewards[1].fn == "format" and cfg.env.rewards[1].judge is None


class Scripted:
    """A local OpenAI-compatible endpoint whose replies a test scripts: each POST takes the next (status,
    text)."""

    def __init__(self, replies, delay_s=0.0):
        self.replies, self.delay_s = list(replies), delay_s
        self.bodies, self.headers, self.in_flight, self.most_in_flight = [], [], 0, 0
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "judge-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    status, text = outer.replies.pop(0) if outer.replies else (200, "Score: 10")
                    outer.in_flight += 1
                    outer.most_in_flight = max(outer.most_in_flight, outer.in_flight)
                time.sleep(outer.delay_s)
                with lock:
                    outer.in_flight -= 1
                self._send(status, {"choices": [{"message": {"content": text}}]} if status == 200
                           else {"error": text})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def judge_set(url, **kw):
    return RewardSet([RewardSpec(fn="judge",
                                 judge=JudgeConfig(base_url=url, retry_backoff_s=0.05, **kw))], 5.0)


def samples(n):
    return [Sample(id=str(i), question=f"q{i}", answer="a") for i in range(n)]


def test_judge_scores_retries_and_fails_samples_not_the_run(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "s3cret")
    api = Scripted([(200, "Score: 6"), (200, "I refuse to grade."), (503, "busy"), (200, "score=9")])
    try:
        res = judge_set(api.url, api_key_env="MY_JUDGE_KEY",
                        max_concurrency=1).score(["x", "y", "z"], samples(3))
    finally:
        api.close()
    # one at a time, so the script's order is the samples' order; the 503 was retried
    assert res.per_fn["judge"] == [0.6, None, 0.9] and res.total == [0.6, None, 0.9]
    assert res.failures["unparseable"] == 1
    assert res.errors == ["reward judge on sample 1: the judge's reply has no score matching "
                          f"{PATTERN!r}: 'I refuse to grade.' (unparseable)"]
    assert [b["model"] for b in api.bodies] == ["judge-model"] * 4  # asked /models once
    assert all(h["Authorization"] == "Bearer s3cret" for h in api.headers)


def test_judge_refused_or_unreachable_is_a_counted_failure():
    api = Scripted([(400, "bad model")])
    try:
        res = judge_set(api.url, model="nope").score(["x"], samples(1))
    finally:
        api.close()
    assert res.total == [None] and res.failures["judge_failed"] == 1 and len(api.bodies) == 1  # no retry
    assert "refused the request (HTTP 400" in res.errors[0]
    t0 = time.monotonic()
    res = judge_set("http://127.0.0.1:9/v1", model="m", max_retries=2).score(["x", "y"], samples(2))
    assert time.monotonic() - t0 < 5.0
    assert res.failures["judge_failed"] == 2
    assert res.errors[0].startswith("reward judge on sample 0: the judge at http://127.0.0.1:9/v1 failed 3 "
                                    "times (")


def test_judge_concurrency_is_bounded():
    api = Scripted([], delay_s=0.2)
    try:
        res = judge_set(api.url, max_concurrency=3).score(["x"] * 9, samples(9))
    finally:
        api.close()
    assert res.per_fn["judge"] == [1.0] * 9 and api.most_in_flight == 3
