"""How completions are scored: the configured set of reward functions (reward_set.py), the built-ins
(builtin.py), math-verify (math_reward.py), the LLM judge (judge.py) and the worker processes that bound a
call by killing it (pool.py). `Outcome`, the failure reasons and reward lookup by name are in base.py, which
the others build on and which imports none of them."""
