"""The classifier stage (minicd.train.classifier): outputs, predictions scored by evaluate.py,
exact resume after SIGTERM, the CLI and the torchrun refusal."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minicd.config import load_config
from minicd.data.mimic import prepare_mimic3
from minicd.data.records import read_records
from minicd.data.synthetic import SyntheticSpec, write_mimic3
from minicd.discriminative import tune_threshold
from minicd.errors import DistributedError
from minicd.log import read_metrics
from minicd.metrics import corpus_metrics
from minicd.predictions import read_predictions
from minicd.train.classifier import label_matrix, linear_warmup_decay, load_coder, run_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    write_mimic3(root / "raw", SyntheticSpec(n_admissions=200, min_words=80, max_words=180,
                                             max_codes=6))
    prepare_mimic3(root / "raw", root / "data", min_count=3)
    data_dir = root / "data" / "mimic3" / "top50"
    config = root / "clf.toml"
    config.write_text(f"""
[data]
dir = "{data_dir}"
[train]
seed = 0
device = "cpu"
micro_batch_size = 8
grad_accum = 2
save_every = 3
keep_last = 2
[classifier]
model = "laat"
embed_dim = 8
rnn_size = 8
projection_size = 8
num_filters = 8
kernel_size = 3
lr = 1e-2
warmup_steps = 2
epochs = 2
max_tokens = 60
min_count = 2
""")
    return {"root": root, "data_dir": data_dir, "config": config}


def _cfg(assets, out, *overrides):
    return load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}", *overrides],
                       stage="classifier")


def test_linear_warmup_decay_by_hand():
    assert [linear_warmup_decay(s, 2, 6) for s in range(7)] == [0, 0.5, 1, 0.75, 0.5, 0.25, 0]
    assert linear_warmup_decay(0, 0, 4) == 1.0


@pytest.mark.parametrize("model", ["laat", "caml"])
def test_run_writes_model_threshold_and_predictions(assets, tmp_path, model):
    out = tmp_path / model
    res = run_classifier(_cfg(assets, out, f"classifier.model={model}"))
    assert res["stopped"] is False and res["step"] > 0
    meta = json.loads((out / "classifier.json").read_text())
    train = read_records(assets["data_dir"] / "train.jsonl")
    assert meta["labels"] == sorted({c for r in train for c in r.codes})
    # the saved threshold is the grid's best on val for the saved (best) weights
    coder = load_coder(out)
    val = read_records(assets["data_dir"] / "val.jsonl")
    probs = coder.probabilities([coder.encode(r.note) for r in val], torch.device("cpu"), 16)
    assert meta["threshold"] == pytest.approx(tune_threshold(probs, label_matrix(val, coder.labels).numpy()))
    rows = read_predictions(out / "predictions" / "test.jsonl")
    test = read_records(assets["data_dir"] / "test.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in test]
    assert all(r["response"].startswith("<code>") and len(r["scores"]) == min(50, len(coder.labels))
               for r in rows)
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, res["step"] + 1))
    assert "val/threshold" in lines[-1]
    note = test[0].note
    assert note[:30] not in (out / "metrics.jsonl").read_text()


def test_evaluate_scores_equal_corpus_metrics_on_thresholded_probs(assets, tmp_path):
    out = tmp_path / "run"
    run_classifier(_cfg(assets, out, "classifier.model=caml"))
    coder = load_coder(out)
    test = read_records(assets["data_dir"] / "test.jsonl")
    probs = coder.probabilities([coder.encode(r.note) for r in test], torch.device("cpu"), 4)
    preds = [[c for c, p in zip(coder.labels, row) if p >= coder.threshold] for row in probs]
    golds = [r.codes for r in test]
    expect = corpus_metrics(preds, golds, label_space=sorted({c for g in golds for c in g}))
    ev = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sft = tmp_path / "sft.jsonl"  # the same responses without scores: an LLM run's file
    sft.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "scores"}) + "\n"
                           for r in read_predictions(out / "predictions" / "test.jsonl")))
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--gold", str(assets["data_dir"]),
                        "--run", f"CAML:CNN={out / 'predictions' / 'test.jsonl'}",
                        "--run", f"SFT:tiny={sft}",
                        "--out", str(ev)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads((ev / "results.json").read_text())["runs"][0]
    assert got["group"] == "PLM Baselines"
    for key in ("micro_precision", "micro_recall", "micro_f1", "macro_f1"):
        assert got["metrics"][key] == pytest.approx(expect[key], abs=1e-12), key
    # two groups in the table: each opens with its title, the PLM Baselines first
    md = (ev / "table.md").read_text().splitlines()
    assert md[2].startswith("| **PLM Baselines** |") and md[3].startswith("| CAML | CNN |")
    assert md[4].startswith("| **LLM (Post-training)** |") and md[5].startswith("| SFT | tiny |")
    assert "-- PLM Baselines" in r.stdout


def test_resume_after_sigterm_gives_the_same_weights(assets, tmp_path, monkeypatch):
    import minicd.train.classifier as clf

    full = tmp_path / "full"
    res_full = run_classifier(_cfg(assets, full, "classifier.model=laat",
                                   "classifier.embed_dropout=0.3"))

    class SignalAtStep2(clf.SigtermFlag):
        """The real flag; its second poll (after step 2) raises a real SIGTERM first."""
        calls = 0

        @property
        def triggered(self):
            SignalAtStep2.calls += 1
            if SignalAtStep2.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag
            return self._triggered

        @triggered.setter
        def triggered(self, value):
            self._triggered = value

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        m.setattr(clf, "SigtermFlag", SignalAtStep2)
        res = run_classifier(_cfg(assets, part, "classifier.model=laat",
                                  "classifier.embed_dropout=0.3"))
    assert res["stopped"] is True and res["step"] == 2
    assert not (part / "predictions").exists()
    res2 = run_classifier(_cfg(assets, part, "classifier.model=laat",
                               "classifier.embed_dropout=0.3", "train.resume=true"))
    assert res2["stopped"] is False and res2["step"] == res_full["step"] > 2
    last = f"step-{res2['step']:08d}"
    a = load_file(str(full / "checkpoints" / last / "model" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / last / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    assert json.loads((full / "classifier.json").read_text())["threshold"] == \
        json.loads((part / "classifier.json").read_text())["threshold"]


def test_torchrun_is_refused_before_any_work(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="one process"):
        run_classifier(_cfg(assets, tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli_and_config_errors(assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINICD_NO_PROGRESS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "cli"
    ok = cli("--stage", "classifier", "--config", str(assets["config"]), f"train.output_dir={out}",
             "train.max_steps=2", "classifier.model=cnn", "train.num_threads=1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "threshold=" in ok.stdout and (out / "predictions" / "test.jsonl").is_file()
    bad = cli("--stage", "classifier", "--config", str(assets["config"]), "classifier.model=lat")
    assert bad.returncode == 2 and "classifier.model = 'lat': expected one of" in bad.stderr
    bad = cli("--stage", "classifier", "--config", str(assets["config"]),
              "classifier.embed_dropout=1.5")
    assert bad.returncode == 2 and "classifier.embed_dropout = 1.5: must be in [0, 1)" in bad.stderr
    plm = cli("--stage", "classifier", "--config", str(assets["config"]), "classifier.model=plmicd")
    assert plm.returncode == 2 and "classifier.encoder_path" in plm.stderr
    assert "Traceback" not in bad.stderr + plm.stderr


def test_plmicd_stage_end_to_end(assets, tmp_path):
    """PLM-ICD through the stage: a random RoBERTa saved by transformers and a byte-level BPE
    tokenizer (vocab.json + merges.txt) trained on the training notes."""
    import transformers
    from tokenizers.implementations import ByteLevelBPETokenizer

    enc_dir = tmp_path / "roberta"
    enc_dir.mkdir()
    notes = [r.note for r in read_records(assets["data_dir"] / "train.jsonl")]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(notes, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(enc_dir))
    assert bpe.token_to_id("<pad>") == 1
    cfg = transformers.RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=40,
                                     type_vocab_size=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.RobertaModel(cfg).save_pretrained(enc_dir, safe_serialization=True)
    out = tmp_path / "plm"
    res = run_classifier(_cfg(assets, out, "classifier.model=plmicd",
                              f"classifier.encoder_path={json.dumps(str(enc_dir))}",
                              "classifier.segment_length=16", "classifier.max_tokens=100",
                              "classifier.lr=1e-3", "train.max_steps=2"))
    assert res["step"] == 2 and not res["stopped"]
    coder = load_coder(out)
    ids = coder.encode(notes[0])
    assert ids[0] == coder.tokenizer.bos_id and ids[-1] == coder.tokenizer.eos_id
    assert len(ids) == 100  # a long note: cut to max_tokens, so it spans 7 segments of 16
    x, m = coder.collate([ids, ids[:10]])
    assert x.shape == (2, 7, 16) and m[1, 1:].sum() == 0
    rows = read_predictions(out / "predictions" / "test.jsonl")
    assert len(rows) == len(read_records(assets["data_dir"] / "test.jsonl"))
