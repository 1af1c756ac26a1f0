"""Rank-sharded generation with the torch engine on an FSDP2-sharded policy.

Run as `python sharded_generate.py OUT` (one process, plain module) or under
`torchrun --nproc_per_node 2` (FSDP2, gloo). Prompts of different lengths are dealt in chunks
(``sharded_generate``), so the ranks need different numbers of forwards; the engine's lockstep
keeps them together. Writes OUT/generations.json on rank 0: sampled and greedy token ids, plus
each rank's dummy-forward count.
"""

import json
import sys
from pathlib import Path

import torch

from minicd.dist import destroy_distributed, exit_process, get_rank, init_distributed, shard_model
from minicd.dist import all_gather_objects
from minicd.model.hub import build_model
from minicd.rollout import lockstep
from minicd.rollout.engine import SamplingParams
from minicd.rollout.inference import sharded_generate
from minicd.rollout.torch_engine import TorchEngine

from fsdp_lora_train import VOCAB, tiny_config

# 5 prompts: chunks of 2 -> rank 0 gets [0, 1] and [4], rank 1 gets [2, 3] (2 ranks)
PROMPTS = [[3, 9, 4], [7, 1, 1, 8, 2, 5], [11], [6, 6, 2, 30], [42, 17]]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    init_distributed(device="cpu")
    model = build_model(tiny_config(), seed=0)
    shard_model(model)
    counts = []
    real_init = lockstep.Lockstep.__init__

    def counting_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        counts.append(self)

    lockstep.Lockstep.__init__ = counting_init
    engine = TorchEngine(model, max_batch_size=2)
    # stop on a frequent token so rows end at different steps
    sampled = sharded_generate(engine, PROMPTS, SamplingParams(
        n=3, temperature=1.0, max_new_tokens=12, stop_ids=(5, 7, 9), seed=11), chunk_size=2)
    greedy = sharded_generate(engine, PROMPTS, SamplingParams(
        temperature=0.0, max_new_tokens=12, stop_ids=(5,)), chunk_size=2)
    dummy = all_gather_objects(sum(c.dummy_forwards for c in counts))
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "generations.json").write_text(json.dumps({
            "sampled": [[g.token_ids for g in group] for group in sampled],
            "greedy": [group[0].token_ids for group in greedy],
            "prompt_index": [group[0].prompt_index for group in sampled],
            "lockstep_contexts": len(counts), "dummy_forwards": dummy}))
    destroy_distributed(sync=True)


if __name__ == "__main__":
    assert VOCAB > max(max(p) for p in PROMPTS)
    main(Path(sys.argv[1]))
    exit_process(0)
