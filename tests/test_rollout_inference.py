"""minicd.rollout.inference: per-prompt seeds make sampled rollouts independent of how prompts are
chunked (what rank-sharding relies on), batch inference resumes, one engine per stage."""

from __future__ import annotations

import dataclasses


import minicd.rollout.inference as inference
from minicd.data.records import Record
from minicd.model.hub import QwenConfig, build_model
from minicd.predictions import read_predictions
from minicd.rollout.engine import Generation, RolloutEngine, SamplingParams
from minicd.rollout.torch_engine import TorchEngine

PROMPTS = [[3, 9, 4], [7, 1, 1, 8, 2, 5], [11], [6, 6, 2, 30], [42, 17]]
CODE_OF_LENGTH = {3: "401.9", 6: "428.0", 1: "584.9", 4: "250.00", 2: "038.9"}


def tiny_model():
    cfg = QwenConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, max_position_embeddings=128)
    return build_model(cfg, seed=0)


def tokens(groups):
    return [[g.token_ids for g in group] for group in groups]


def test_torch_engine_seeds_each_prompt_and_chunking_does_not_matter():
    engine = TorchEngine(tiny_model(), max_batch_size=4)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, stop_ids=(5,), seed=7)
    whole = engine.generate(PROMPTS, params)
    # the protocol's contract: prompt i's samples are those of a call on it alone at seed + i*n
    alone = [engine.generate([p], dataclasses.replace(params, seed=7 + i * 3))[0]
             for i, p in enumerate(PROMPTS)]
    assert tokens(whole) == tokens(alone)
    assert [g.prompt_index for group in whole for g in group] == [i for i in range(5)
                                                                 for _ in range(3)]
    assert len({tuple(t) for group in tokens(whole) for t in group}) > 5  # really sampled
    for chunk in (1, 2, 5):  # one process: any chunking gives the same samples and indices
        got = inference.sharded_generate(engine, PROMPTS, params, chunk_size=chunk)
        assert tokens(got) == tokens(whole)
        assert [group[0].prompt_index for group in got] == list(range(5))
    assert isinstance(engine, RolloutEngine)


class CountingEngine:
    """Answers each prompt with the code of its length; counts prompts and closes."""

    def __init__(self):
        self.seen, self.closed, self.version = 0, 0, 0

    weight_version = property(lambda self: self.version)

    def sync_policy(self, model):
        self.version += 1
        return self.version

    def lockstep(self):
        raise AssertionError("one process needs no lockstep")

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def close(self):
        self.closed += 1

    def generate(self, prompts, params):
        self.seen += len(prompts)
        return [[Generation(i, 0, [1], f"<code>{CODE_OF_LENGTH[len(p)]}</code>", "stop")]
                for i, p in enumerate(prompts)]


def test_rollout_records_appends_and_resumes(tmp_path):
    recs = [Record(str(i), str(i), "train", "note", (CODE_OF_LENGTH[len(p)],), "icd9")
            for i, p in enumerate(PROMPTS)]
    encode = lambda rs: [PROMPTS[int(r.id)] for r in rs]  # noqa: E731
    engine, out = CountingEngine(), tmp_path / "p.jsonl"
    params = SamplingParams(temperature=0.0, max_new_tokens=2)
    assert inference.rollout_records(engine, recs[:3], encode, out, params,
                                     chunk_size=2) == (3, 0)
    assert inference.rollout_records(engine, recs, encode, out, params, chunk_size=2) == (2, 3)
    assert engine.seen == 5  # the first three were not decoded again
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["codes"] for r in rows] == [[c] for c in CODE_OF_LENGTH.values()]
    assert inference.score_predictions(out, recs)["micro_f1"] == 1.0
    # a record without a row counts as an empty prediction: 5 of 6 gold codes found
    extra = Record("9", "9", "train", "note", ("401.9",), "icd9")
    assert inference.score_predictions(out, recs + [extra])["micro_recall"] == 5 / 6


def test_stage_engine_builds_once_and_closes_once(monkeypatch):
    built = []
    monkeypatch.setattr(inference, "build_engine",
                        lambda *a, **k: built.append(CountingEngine()) or built[-1])
    slot = inference.StageEngine()
    first = slot.get(None, None, None, None)
    assert slot.get(None, None, None, None) is first and slot.constructions == 1
    slot.close()
    slot.close()
    assert first.closed == 1 and len(built) == 1
