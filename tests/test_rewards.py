"""Reward functions on hand-written completions, and a reward set that survives every way a function fails."""

from __future__ import annotations

import math
import time

import pytest

from vlrl.bounded import run_bounded
from vlrl.config import RewardSpec
from vlrl.rewards.base import RewardError, resolve_reward
from vlrl.rewards.builtin import (
    answer_part,
    box_iou,
    exact_match,
    format_reward,
    iou,
    multiple_choice,
    normalize,
    numbers_in,
    numeric,
)
from vlrl.rewards.reward_set import RewardSet
from vlrl.sample import Sample


def S(answer, id="s0"):
    return Sample(id=id, question="q", answer=answer)


# --- parsing helpers ------------------------------------------------------------------------------------


def test_answer_part_is_after_the_last_think_end():
    assert answer_part("<think>red?</think>blue") == "blue"
    assert answer_part("a</think>b</think> c") == " c"
    assert answer_part("no tags") == "no tags"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Red.  ", "red"),
        ("**Blue**", "blue"),
        ('"green"!', "green"),
        ("The   big\n dog", "the big dog"),
        ("-3", "-3"),  # the sign is kept
        ("(B)", "b"),
        ("«oui»", "oui"),
        ("...", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000 apples", [1000.0]),
        ("-3.5 and +2", [-3.5, 2.0]),
        ("1/2", [0.5]),
        ("5-3=2", [5.0, 3.0, 2.0]),  # binary minus, not a sign
        ("x1 and v1.5 are names", []),
        ("\\frac{3}{4}", [0.75]),
        ("1,2,3", [1.0, 2.0, 3.0]),
        ("costs $1,234.50.", [1234.5]),
        ("2e3", [2000.0]),
    ],
)
def test_numbers_in(text, expected):
    assert numbers_in(text) == expected


# --- built-in rewards -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("red", "red", 1.0),
        ("  Red. ", "red", 1.0),
        ("red", "Red", 1.0),
        ("dark  red", "dark red", 1.0),
        ("reddish", "red", 0.0),
        ("The answer is red", "red", 0.0),  # exact, not contains
        ("<think>maybe blue</think> red", "red", 1.0),
        ("<think>red</think> blue", "red", 0.0),  # reasoning is not scored
        ("<think>a</think>x</think>red", "red", 1.0),  # after the last </think>
        ("4", 4, 1.0),
        ("-3", "3", 0.0),
        ("blue", ["red", "blue"], 1.0),  # a list holds alternatives
        ("", "red", 0.0),
    ],
)
def test_exact_match(completion, answer, expected):
    assert exact_match(completion, S(answer)) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("B", "B", 1.0),
        ("(B)", "B", 1.0),
        ("B.", "B", 1.0),
        ("The answer is B", "B", 1.0),
        ("The answer is (C).", "B", 0.0),
        ("b", "B", 0.0),  # lower case is not an option letter
        ("Because", "B", 0.0),  # not standalone
        ("C or B", "B", 0.0),  # the first letter counts
        ("<think>A? no, B</think>Answer: B", "B", 1.0),
        ("<think>B</think>A", "B", 0.0),
        ("K", "K", None),  # K is outside A-J: a bad answer raises
        ("B", "(b)", 1.0),
        ("No letter here", "A", 0.0),
        ("J", "J", 1.0),
    ],
)
def test_multiple_choice(completion, answer, expected):
    if expected is None:
        with pytest.raises(ValueError, match="not a letter A-J"):
            multiple_choice(completion, S(answer))
    else:
        assert multiple_choice(completion, S(answer)) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42", 42, 1.0),
        ("The total is 1,000 dollars.", 1000, 1.0),
        ("so -3.5", "-3.5", 1.0),
        ("it is 1/2", 0.5, 1.0),
        ("3 apples and 4 pears, 7 in all", 7, 1.0),  # the last number
        ("first \\boxed{12} then 13", 12, 1.0),  # boxed wins over the last number
        ("\\boxed{\\frac{1}{3}}", 1 / 3, 1.0),
        ("\\boxed{x^{2}+1} = 5", 5, 0.0),  # a box without a number scores 0, no fallback
        ("0.3333333", 1 / 3, 1.0),  # relative error 1e-7: inside the tolerance
        ("0.33333", 1 / 3, 0.0),  # relative error 1e-5: outside
        ("100.00005", 100, 1.0),  # within 1e-6 relative
        ("100.001", 100, 0.0),
        ("no number", 5, 0.0),
        ("<think>7</think>8", 7, 0.0),
        ("72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K-style answer
        ("5-3", 3, 1.0),
        ("5-3", -3, 0.0),
        ("0", 0, 1.0),
    ],
)
def test_numeric(completion, answer, expected):
    assert numeric(completion, S(answer)) == expected


def test_numeric_needs_a_numeric_answer():
    with pytest.raises(ValueError, match="holds no number"):
        numeric("1", S("seven"))
    with pytest.raises(ValueError, match="has no answer"):
        exact_match("1", S(None))


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think> A", 1.0),
        ("  <think>\nlong\nthought\n</think>\n\nred", 1.0),
        ("<think></think>red", 1.0),
        ("<think>x</think>", 0.0),
        ("<think>x</think>  \n", 0.0),
        ("red", 0.0),
        ("red <think>x</think> blue", 0.0),
        ("<think>x</think> A </think> B", 0.0),
        ("<think>a<think>b</think>c", 0.0),
        ("<think>unclosed", 0.0),
    ],
)
def test_format(completion, expected):
    assert format_reward(completion, S("anything")) == expected
    assert resolve_reward("format") is format_reward


def test_box_iou_by_hand():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert box_iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box has no area
    assert box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # empty union


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("[0, 0, 10, 10]", [0, 0, 10, 10], 1.0),
        ("The box is (5,5),(15,15).", [0, 0, 10, 10], 25 / 175),
        ("x1=0, y1=0, x2=5, y2=5", [0, 0, 10, 10], 0.25),  # digits in names are not coordinates
        ("[0, 0, 10, 10]", "[0, 0, 10, 20]", 0.5),  # answer given as a string
        ("[100,200,300,400]", [100, 200, 300, 400], 1.0),  # no thousands commas in boxes
        ("[0, 0, 10]", [0, 0, 10, 10], 0.0),  # three numbers: unparsable
        ("nothing", [0, 0, 10, 10], 0.0),
        ("<think>[0,0,10,10]</think>[20, 20, 30, 30]", [0, 0, 10, 10], 0.0),
        ("[0.5, 0.5, 1.5, 1.5] then 9 9", [0.5, 0.5, 1.5, 1.5], 1.0),
    ],
)
def test_iou(completion, answer, expected):
    assert iou(completion, S(answer)) == pytest.approx(expected)


def test_iou_needs_a_box_answer():
    with pytest.raises(ValueError, match=r"is not a box \[x1, y1, x2, y2\]"):
        iou("[0,0,1,1]", S([1, 2]))


# --- resolving names ------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import math, time\n"
        "def length_bonus(completion, sample):\n"
        "    return len(completion) / 10\n"
        "def boom(completion, sample):\n"
        "    raise RuntimeError('kaboom ' + sample.id)\n"
        "def nothing(completion, sample):\n"
        "    return None\n"
        "def nan(completion, sample):\n"
        "    return math.nan if sample.id == 'a' else math.inf\n"
        "def text(completion, sample):\n"
        "    return 'high'\n"
        "def flag(completion, sample):\n"
        "    return completion == 'yes'\n"
        "def slow(completion, sample):\n"
        "    time.sleep(30)\n"
        "    return 1.0\n"
        "def hang_forever(completion, sample):\n"
        "    import os\n"
        "    open(sample.meta['pidfile'], 'w').write(str(os.getpid()))\n"
        "    time.sleep(1000)\n"
        "def die(completion, sample):\n"
        "    import os\n"
        "    os._exit(3)\n"
        "def picky(completion, sample):\n"
        "    from vlrl.rewards.base import RewardFailure\n"
        "    raise RewardFailure('unparseable', 'no verdict in ' + repr(completion))\n"
        "class Counted:\n"
        "    pickled = 0\n"
        "    def __getstate__(self):\n"
        "        Counted.pickled += 1\n"
        "        return {}\n"
        "def seen_twice(completion, sample):\n"
        "    return float(sample.meta['twice'] is sample.meta['also'])\n"
        "class Scorers:\n"
        "    @staticmethod\n"
        "    def half(completion, sample):\n"
        "        return 0.5\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_resolve_builtin_and_user_functions(user_module):
    assert resolve_reward("exact_match") is exact_match
    fn = resolve_reward("my_rewards:length_bonus")
    assert fn("abcde", S("x")) == 0.5
    assert resolve_reward("my_rewards:Scorers.half")("", S(1)) == 0.5


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "exact",
            r"reward 'exact': not a built-in reward \(exact_match, choice, multiple_choice, numeric, format, "
            r"iou, math, judge\)",
        ),
        (
            "no_such_module_xyz:f",
            r"reward 'no_such_module_xyz:f': module 'no_such_module_xyz' could not be imported",
        ),
        (
            "broken_rewards:f",
            r"module 'broken_rewards' could not be imported \(ModuleNotFoundError: .*does_not_exist",
        ),
        (
            "my_rewards:missing",
            r"reward 'my_rewards:missing': module 'my_rewards' has no attribute 'missing'",
        ),
        (
            "my_rewards:NOT_CALLABLE",
            r"reward 'my_rewards:NOT_CALLABLE': 'NOT_CALLABLE' is a int, not a function",
        ),
        ("my_rewards:", r"expected module:function"),
    ],
)
def test_resolve_errors_name_the_spec(user_module, name, message):
    with pytest.raises(RewardError, match=message):
        resolve_reward(name)
    with pytest.raises(RewardError, match=message):
        RewardSet([RewardSpec(fn=name)], timeout_s=1.0)


# --- reward sets ----------------------------------------------------------------------------------------


def test_weighted_sum_and_per_fn(user_module):
    rs = RewardSet(
        [
            RewardSpec(fn="exact_match", weight=1.0),
            RewardSpec(fn="format", weight=0.5),
            RewardSpec(fn="my_rewards:flag", weight=2.0),
        ],
        timeout_s=5.0,
    )
    samples = [S("red", "a"), S("red", "b"), S("yes", "c")]
    res = rs.score(["<think>hm</think>red", "blue", "yes"], samples)
    assert res.per_fn == {
        "exact_match": [1.0, 0.0, 1.0],
        "format": [1.0, 0.0, 0.0],
        "my_rewards:flag": [0.0, 0.0, 1.0],  # bools count as numbers
    }
    assert res.total == [1.5, 0.0, 3.0]
    assert set(res.failures) >= {"raised", "timeout", "crashed", "nan", "none", "not_a_number"}
    assert sum(res.failures.values()) == 0
    assert res.errors == []


def test_repeated_fn_gets_its_own_key():
    rs = RewardSet([RewardSpec(fn="exact_match"), RewardSpec(fn="exact_match", weight=-1.0)], timeout_s=5.0)
    res = rs.score(["red"], [S("red")])
    assert res.per_fn == {"exact_match": [1.0], "exact_match#2": [1.0]}
    assert res.total == [0.0]


@pytest.mark.parametrize(
    "fn, reason, message",
    [
        (
            "my_rewards:boom",
            "raised",
            "reward my_rewards:boom on sample a: raised RuntimeError: kaboom a (raised)",
        ),
        ("my_rewards:nothing", "none", "reward my_rewards:nothing on sample a: returned None (none)"),
        ("my_rewards:nan", "nan", "reward my_rewards:nan on sample a: returned nan (nan)"),
        (
            "my_rewards:text",
            "not_a_number",
            "reward my_rewards:text on sample a: returned 'high' (not_a_number)",
        ),
    ],
)
def test_failing_function_marks_the_sample_not_the_run(user_module, fn, reason, message):
    rs = RewardSet([RewardSpec(fn="exact_match"), RewardSpec(fn=fn)], timeout_s=5.0)
    res = rs.score(["red", "blue"], [S("red", "a"), S("red", "b")])
    assert res.total == [None, None]
    assert res.per_fn["exact_match"] == [1.0, 0.0]  # the healthy function still reports
    assert res.per_fn[fn] == [None, None]
    assert res.failures[reason] == 2 and sum(res.failures.values()) == 2
    assert res.errors[0] == message and len(res.errors) == 2


def test_hanging_function_times_out_without_blocking(user_module):
    rs = RewardSet(
        [RewardSpec(fn="my_rewards:slow"), RewardSpec(fn="exact_match", weight=3.0)], timeout_s=0.5
    )
    t0 = time.monotonic()
    res = rs.score(["red", "red"], [S("red", "a"), S("blue", "b")])
    elapsed = time.monotonic() - t0
    assert elapsed < 10.0  # a blocked step would wait the 30 s the function sleeps; the timeout is 0.5 s
    assert res.failures["timeout"] == 2
    assert res.total == [None, None]
    assert res.per_fn["exact_match"] == [1.0, 0.0]
    assert res.errors[0] == "reward my_rewards:slow on sample a: did not return within 0.5 s (timeout)"


def test_hung_workers_are_replaced_so_queued_calls_still_run():
    """One worker: the first call hangs; the calls queued behind it still run and each gets its own clock."""

    def hang():
        time.sleep(30)
        return 1

    calls = [hang, lambda: 2, lambda: 3]
    t0 = time.monotonic()
    out = run_bounded(calls, timeout_s=0.3, max_workers=1)
    assert time.monotonic() - t0 < 10.0  # waiting for the hung call would take 30 s
    assert out[0] == ("timeout", None) and out[1:] == [("ok", 2), ("ok", 3)]


def test_slow_but_in_time_calls_are_not_cut_by_queueing():
    """Thirty 0.1 s calls on two workers take 1.5 s in all, but each is far inside its own 1 s limit (a clock
    started at the batch's start would cut the last half of them)."""
    out = run_bounded([lambda: (time.sleep(0.1), 7)[1]] * 30, timeout_s=1.0, max_workers=2)
    assert out == [("ok", 7)] * 30


def test_score_checks_lengths_and_empty_specs():
    with pytest.raises(ValueError, match="2 completions for 1 samples"):
        RewardSet([RewardSpec(fn="exact_match")], 1.0).score(["a", "b"], [S("a")])
    with pytest.raises(RewardError, match="env.rewards is empty"):
        RewardSet([], 1.0)
    assert math.isnan(numbers_in("1/0")[0])


def test_choice_rewards_the_first_option_mentioned():
    from vlrl.rewards.builtin import choice
    from vlrl.sample import Sample

    s = Sample(id="c", question="q", answer="red", meta={"options": ["blue", "green", "red", "yellow"]})
    assert choice("red", s) == 1.0
    assert choice("It is Red.", s) == 1.0
    assert choice("blue red green yellow", s) == 0.0  # listing them all: the first one counts
    assert choice("red blue", s) == 1.0
    assert choice("reddish", s) == 0.0  # whole words only
    assert choice("no idea", s) == 0.0
    assert choice("<think>maybe blue</think>red", s) == 1.0  # reasoning is not scored
    with pytest.raises(ValueError, match="meta"):
        choice("red", Sample(id="x", question="q", answer="red"))


def test_builtin_tasks_carry_their_options():
    from vlrl.data.builtin import TASKS
    from vlrl.rewards.builtin import choice

    for name, task in TASKS.items():
        for s in task("train", 8, 64):
            assert str(s.answer) in s.meta["options"], name
            assert choice(str(s.answer), s) == 1.0


# --- user functions run in processes that can be killed ------------------------------------------------


def test_a_hung_user_function_is_killed_not_abandoned(user_module, tmp_path):
    """The process of a call past its deadline is killed (a thread would run on); with one worker, the calls
    queued behind it still run, in a replacement process, each with its own clock."""
    import os

    rs = RewardSet([RewardSpec(fn="my_rewards:hang_forever"), RewardSpec(fn="my_rewards:length_bonus")],
                   timeout_s=0.5, processes=1)
    pidfile = tmp_path / "pid"
    sample = Sample(id="h", question="q", answer="a", meta={"pidfile": str(pidfile)})
    t0 = time.monotonic()
    res = rs.score(["abcde"], [sample])
    assert time.monotonic() - t0 < 3.0
    assert res.per_fn == {"my_rewards:hang_forever": [None], "my_rewards:length_bonus": [0.5]}
    assert res.errors == ["reward my_rewards:hang_forever on sample h: did not return within 0.5 s (timeout)"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # gone, and reaped
    rs.close()


def test_a_reward_module_slow_to_import_is_not_timed_out(tmp_path, monkeypatch):
    """A worker's start (fork, importing the user's module) is outside a call's clock: a module that takes 2 s
    to import, under a 1 s timeout, scores every call (on a loaded machine the default 10 s was eaten by the
    import and a resumed run's first rewards timed out)."""
    (tmp_path / "slow_import_rewards.py").write_text("import time\ntime.sleep(2.0)\n"
                                                     "def one(completion, sample):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet([RewardSpec(fn="slow_import_rewards:one")], timeout_s=1.0, processes=2)
    try:
        res = rs.score(["a", "b", "c"], [S("x", "a")] * 3)
        assert res.per_fn["slow_import_rewards:one"] == [1.0, 1.0, 1.0] and not any(res.failures.values()), res.errors
    finally:
        rs.close()


def test_a_call_that_takes_its_process_down_is_counted_and_replaced(user_module):
    rs = RewardSet([RewardSpec(fn="my_rewards:die"), RewardSpec(fn="my_rewards:flag")], timeout_s=5.0,
                   processes=1)
    for _ in range(2):  # the second batch runs on replacement processes
        res = rs.score(["yes", "no"], [S("x", "a"), S("x", "b")])
        assert res.failures["crashed"] == 2 and res.per_fn["my_rewards:flag"] == [1.0, 0.0]
        assert res.errors[0] == ("reward my_rewards:die on sample a: crashed its process (exit code 3) "
                                 "(crashed)")
    rs.close()


def test_a_sample_crosses_to_a_reward_process_once_per_batch(user_module):
    """A GRPO group's completions share one sample: it is pickled once a batch, and a worker that already
    holds it gets only the completion (a 448x448 PIL image costs ~2 ms a call otherwise: bench/rewards.py)."""
    import my_rewards

    counted = my_rewards.Counted()
    sample = Sample(id="g", question="q", answer="a", meta={"twice": counted, "also": counted})
    rs = RewardSet([RewardSpec(fn="my_rewards:seen_twice"), RewardSpec(fn="my_rewards:length_bonus")], 5.0,
                   processes=2)
    res = rs.score(["abcd"] * 8, [sample] * 8)
    # the sample arrived whole (shared references kept)
    assert res.per_fn["my_rewards:seen_twice"] == [1.0] * 8
    assert my_rewards.Counted.pickled == 1
    rs.score(["abcd"] * 8, [sample] * 8)
    assert my_rewards.Counted.pickled == 2  # a new batch sends it again (its content may have changed)
    rs.close()


def test_a_function_may_fail_a_sample_under_its_own_reason(user_module):
    res = RewardSet([RewardSpec(fn="my_rewards:picky")], timeout_s=5.0).score(["hm"], [S("x", "a")])
    assert res.total == [None] and res.failures["unparseable"] == 1
    assert res.errors == ["reward my_rewards:picky on sample a: no verdict in 'hm' (unparseable)"]


# --- math (math-verify) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # decimal vs LaTeX fraction
        ("$\\boxed{\\frac{1}{2}}$", "1/2", 1.0),  # plain-text gold
        ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
        ("\\boxed{50\\%}", "0.5", 1.0),  # percentage
        ("\\boxed{(1,2]}", "(1, 2]", 1.0),  # interval
        ("\\boxed{[1,2]}", "(1, 2]", 0.0),  # closed is not half-open
        ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1.0),  # set, any order
        ("\\boxed{y=1+2x}", "y = 2x + 1", 1.0),  # equation
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),  # symbolic equality
        ("\\boxed{60^\\circ}", "60", 1.0),
        ("the answer is 3", "3", 1.0),  # no box: the last expression
        ("I think 4. \\boxed{3}", "3", 1.0),  # the box wins
        ("<think>\\boxed{3}</think> \\boxed{\\frac12}", "\\frac{1}{2}", 1.0),  # reasoning is not scored
        ("no idea", "3", 0.0),
        ("\\boxed{7}", ["6", "7"], 1.0),  # any of several answers
    ],
)
def test_math(completion, answer, expected):
    from vlrl.rewards.math_reward import math_reward

    assert math_reward(completion, S(answer)) == expected


def test_math_needs_an_answer():
    from vlrl.rewards.math_reward import math_reward

    with pytest.raises(ValueError, match="sample s0 has no answer"):
        math_reward("\\boxed{1}", S(None))


def test_a_pathological_math_answer_cannot_hang_a_step():
    """`10^{10^{10}}` sends sympy into one C-level big-integer power: math-verify's SIGALRM timeout could not
    interrupt it even in a main thread, and on a thread it would spin for good. In a killed process it is a
    counted timeout, and the other samples of the batch are scored."""
    rs = RewardSet([RewardSpec(fn="math")], timeout_s=2.0, processes=2)
    t0 = time.monotonic()
    res = rs.score(["\\boxed{10^{10^{10}}}", "\\boxed{\\frac{6}{4}}"], [S("7", "p"), S("1.5", "q")])
    assert time.monotonic() - t0 < 6.0
    assert res.per_fn["math"] == [None, 1.0] and res.failures["timeout"] == 1
    assert res.errors == ["reward math on sample p: did not return within 2 s (timeout)"]
    rs.close()


def test_an_unpicklable_sample_fails_its_calls_not_the_pool(user_module):
    rs = RewardSet([RewardSpec(fn="my_rewards:length_bonus")], 5.0, processes=1)
    bad = Sample(id="u", question="q", answer="a", meta={"f": lambda: 0})
    res = rs.score(["ab", "abcd"], [bad, S("x", "ok")])
    assert res.per_fn["my_rewards:length_bonus"] == [None, 0.4] and res.failures["raised"] == 1
    assert res.errors[0].startswith("reward my_rewards:length_bonus on sample u: its sample cannot be sent "
                                    "to a reward process (")
    assert rs.score(["ab"], [bad]).per_fn == {"my_rewards:length_bonus": [None]}  # nothing else to wait for
    rs.close()


def test_reward_processes_end_with_their_set(user_module):
    import gc
    import os

    rs = RewardSet([RewardSpec(fn="my_rewards:length_bonus")], 5.0, processes=2)
    procs = [w.proc for w in rs.pool.alive]
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    del rs
    gc.collect()
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


def test_numeric_keeps_what_math_verify_rounds_away():
    """Why `numeric` stays beside `math`: math-verify compares after rounding to 6 decimals."""
    from vlrl.rewards.math_reward import math_reward

    assert math_reward("\\boxed{0.0000013}", S("0.0000012")) == 1.0  # math-verify: equal
    assert numeric("\\boxed{0.0000013}", S("0.0000012")) == 0.0
    assert numeric("\\boxed{1.3e-9}", S("1.2e-9")) == 0.0 and numeric("\\boxed{1.2e-9}", S("1.2e-9")) == 1.0


def test_a_worker_killed_by_a_step_and_by_close_at_once_is_killed_once(user_module):
    """A Ctrl-C closes the pool while a scoring thread kills a worker whose call ran out of time: the two
    kills meet on one worker. It is killed (and its pipe closed) once; neither raises (closing the pipe twice
    at once raised EBADF, and the trainer exited 1 instead of 130)."""
    import threading

    from vlrl.rewards.pool import RewardPool

    pool = RewardPool(["my_rewards:length_bonus"], size=1)
    w = pool.alive[0]
    assert w.wait_ready() is None
    both_inside = threading.Barrier(2, timeout=10)
    joins = []
    real_join = w.proc.join

    def join(timeout=None):
        joins.append(threading.current_thread().name)
        real_join(timeout)

    w.proc.join = join
    errors = []

    def kill(how):
        try:
            both_inside.wait()
            how()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=kill, args=(lambda: pool._kill(w),), name="step"),
               threading.Thread(target=kill, args=(pool.close,), name="close")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and len(joins) == 1 and not w.proc.is_alive() and w.conn.closed
    assert pool.alive == []
