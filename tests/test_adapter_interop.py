"""The SFT stage's saved adapter (``output_dir/adapter``) is a real PEFT adapter: it loads in
transformers + peft and in vLLM (CPU, float32, its own ``LoRARequest`` on the saved directory),
and all three decode the same greedy tokens as minicd's ``TorchEngine`` with ``load_adapter``.

The tiny model here has head_dim 64 (vLLM's CPU attention rejects 16) and a wide initialisation
(peaked logits: greedy argmax ties, which would make token-for-token comparisons fragile, are
unlikely). A few SFT steps at a high learning rate make the adapter clearly nonzero. The same
checks run on SmolLM2-135M-Instruct (the demo's backbone, converted from its GGUF file).
"""

from __future__ import annotations

import json

import pytest
import torch

from minicd.config import load_config
from minicd.model.hub import load_model, load_tokenizer
from minicd.model.lora import load_adapter
from minicd.rollout.engine import SamplingParams
from minicd.rollout.torch_engine import TorchEngine
from minicd.train.common import load_split, prompt_ids
from minicd.train.sft import run_sft
from train_fixtures import build_assets

N_NEW = 16


@pytest.fixture(scope="module", params=["tiny-qwen3", "smollm2"])
def run(request, tmp_path_factory):
    """A 3-step LoRA SFT run on a head_dim-64 tiny Qwen3, or on SmolLM2-135M-Instruct (llama,
    tied embeddings, converted from GGUF); returns its paths, tokenizer, prompts."""
    root = tmp_path_factory.mktemp("interop")
    built = build_assets(root, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, initializer_range=0.2)
    lr = 5e-2
    if request.param == "smollm2":  # the real backbone; a LoRA-sized learning rate
        built["model_dir"], lr = request.getfixturevalue("smollm2_dir"), 2e-3
    config = root / "sft.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 8
alpha = 16.0
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 256
train_limit = 12
val_limit = 0
[train]
seed = 0
device = "cpu"
micro_batch_size = 4
grad_accum = 1
save_every = 100
output_dir = {json.dumps(str(root / "out"))}
max_steps = 3
[sft]
lr = {lr}
warmup_ratio = 0.0
""")
    cfg = load_config(config)
    run_sft(cfg)
    tok = load_tokenizer(built["model_dir"])
    prompts = [prompt_ids(r, tok, cfg.data) for r in load_split(cfg, "val", 3)]
    return {"model_dir": built["model_dir"], "adapter": root / "out" / "adapter", "tok": tok,
            "prompts": prompts}


@pytest.fixture(scope="module")
def minicd_greedy(run):
    """minicd's greedy tokens: base checkpoint + ``load_adapter`` on the saved dir, TorchEngine."""
    model = load_model(run["model_dir"])
    lora_cfg = load_adapter(model, run["adapter"])
    model.eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_ids=run["tok"].stop_ids)
    gens = TorchEngine(model, run["tok"]).generate(run["prompts"], params)
    return model, lora_cfg, [g[0].token_ids for g in gens]


def _cut_at_stop(tokens: list[int], stop: tuple[int, ...]) -> list[int]:
    """Tokens up to and including the first stop token (as minicd's Generation keeps them)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens


def test_adapter_is_nonzero_and_changes_logits(run, minicd_greedy):
    model = minicd_greedy[0]
    base = load_model(run["model_dir"]).eval()
    ids = torch.tensor([run["prompts"][0]])
    with torch.no_grad():
        diff = float((model(ids) - base(ids)).abs().max())
    print(f"adapter vs base: max |logit diff| {diff:.3g}")
    assert diff > 0.05


def test_transformers_peft_greedy_equals_minicd(run, minicd_greedy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, ours = minicd_greedy
    stop = run["tok"].stop_ids
    hf = AutoModelForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, run["adapter"]).eval()
    for prompt, mine in zip(run["prompts"], ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref_logits = peft_model(input_ids=ids).logits                     # [1, T, V]
            torch.testing.assert_close(model(ids), ref_logits, rtol=0, atol=1e-4)
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      do_sample=False, max_new_tokens=N_NEW,
                                      eos_token_id=list(stop), pad_token_id=run["tok"].pad_id)
        theirs = _cut_at_stop(out[0, len(prompt):].tolist(), stop)
        assert theirs == mine
    print(f"greedy tokens (minicd == transformers+peft): {ours}")


def test_vllm_greedy_equals_minicd(run, minicd_greedy):
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from minicd.rollout.vllm_engine import VLLMEngine

    model, lora_cfg, ours = minicd_greedy
    tok = run["tok"]
    engine = VLLMEngine(run["model_dir"], tok, lora=lora_cfg, dtype="float32", max_model_len=1024,
                        seed=0)
    try:
        # vLLM's own loader on the saved directory
        vocab = engine.llm.llm_engine.model_config.get_vocab_size()
        vparams = VSamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True,
                                  stop_token_ids=[t for t in tok.stop_ids if t < vocab],
                                  detokenize=False)
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]],
                                   vparams, use_tqdm=False,
                                   lora_request=LoRARequest("sft", 1000, str(run["adapter"])))
        assert [list(o.outputs[0].token_ids) for o in outs] == ours
        engine.llm.llm_engine.remove_lora(1000)  # the engine manages its own adapter ids below
        # the engine's adapter push from the live minicd model
        engine.sync_policy(model)
        params = SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_ids=tok.stop_ids)
        assert [g[0].token_ids for g in engine.generate(run["prompts"], params)] == ours
    finally:
        engine.close()
