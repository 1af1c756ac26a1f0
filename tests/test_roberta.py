"""minicd.model.roberta against transformers' RobertaModel on random configs (padded batches)."""

import pytest
import torch
import transformers

from minicd.errors import CheckpointError
from minicd.model.roberta import load_roberta


def _hf_roberta(tmp_path, seed, **kw):
    cfg = transformers.RobertaConfig(
        vocab_size=kw.get("vocab", 97), hidden_size=kw.get("hidden", 32),
        num_hidden_layers=kw.get("layers", 2), num_attention_heads=kw.get("heads", 4),
        intermediate_size=kw.get("inter", 48), max_position_embeddings=kw.get("maxpos", 40),
        type_vocab_size=1, pad_token_id=1, hidden_act=kw.get("act", "gelu"))
    torch.manual_seed(seed)
    model = transformers.RobertaModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so they are tested
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("seed,kw", [
    (0, {}),
    (1, {"hidden": 48, "heads": 3, "layers": 3, "inter": 20, "act": "gelu_new"}),
    (2, {"hidden": 16, "heads": 2, "layers": 1, "vocab": 50}),
])
def test_hidden_states_match_transformers_on_padded_batches(tmp_path, seed, kw):
    hf = _hf_roberta(tmp_path, seed, **kw)
    mine = load_roberta(tmp_path).eval()
    g = torch.Generator().manual_seed(seed)
    vocab = hf.config.vocab_size
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    ids[1, 7:] = 1
    mask[1, 7:] = 0  # right padding
    ids[2, :] = 1
    mask[2, :] = 0   # an all-padding row (a padding segment of PLM-ICD)
    ids[0, 0] = 0    # <s>
    eager = transformers.RobertaModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # default (sdpa)
        ref_eager = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        out = mine(ids, mask)
    assert out.shape == ref.shape == (3, 12, hf.config.hidden_size)
    # every row against the eager attention; rows with a real token also against sdpa (which
    # returns zeros, not eager's uniform average, for an all-padding row)
    assert torch.allclose(out, ref_eager, atol=1e-5, rtol=0), (out - ref_eager).abs().max()
    assert torch.allclose(out[:2], ref[:2], atol=1e-5, rtol=0), (out[:2] - ref[:2]).abs().max()


def test_masked_lm_checkpoint_prefix_loads(tmp_path):
    cfg = transformers.RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=20, type_vocab_size=1)
    torch.manual_seed(3)
    mlm = transformers.RobertaForMaskedLM(cfg).eval()
    mlm.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.tensor([[0, 5, 6, 7, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        ref = mlm.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        out = load_roberta(tmp_path).eval()(ids, mask)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_non_roberta_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type"):
        load_roberta(tmp_path)
