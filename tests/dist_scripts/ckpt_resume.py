"""LoRA training under torchrun (FSDP2, gloo) with checkpoint save / resume.

`torchrun --nproc_per_node 2 ckpt_resume.py OUT` runs, in one launch, OUT/full: 4 steps then a
checkpoint; OUT/part: 2 steps, a checkpoint, then a rebuilt model / optimizer / scheduler with
other seeds that resumes from it and trains to step 4. Each rank uses its own torch RNG (LoRA
dropout) and a shared numpy Generator for the batch order.
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch

from minicd.algo.logprobs import model_token_logprobs
from minicd.checkpoint import capture_rng, load_checkpoint, resume_checkpoint, restore_rng, save_checkpoint
from minicd.dist import destroy_distributed, exit_process, init_distributed, shard_model, trainable_parameters
from minicd.model.hub import build_model
from minicd.model.lora import LoRAConfig, inject_lora
from minicd.model.hf_config import DecoderConfig

VOCAB, SEQ, N_DATA, GLOBAL_BATCH, TOTAL = 96, 12, 16, 4, 4
LCFG = LoRAConfig(r=4, alpha=8.0, dropout=0.1)


def train(info, run_dir: Path, steps: int, resume: bool) -> None:
    """Train to global step ``steps`` (after resuming from run_dir's latest if ``resume``), save."""
    torch.manual_seed(100 + info.rank + (1000 if resume else 0))
    model = build_model(DecoderConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, qk_norm=True,
                                   max_position_embeddings=64, tie_word_embeddings=True), seed=0)
    inject_lora(model, LCFG, generator=torch.Generator().manual_seed(7 if resume else 1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    shard_model(model)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / TOTAL)))
    rng = np.random.default_rng(11 if resume else 3)
    start = 0
    if resume:
        state = load_checkpoint(resume_checkpoint(run_dir), model=model, optimizer=opt,
                                scheduler=sched)
        restore_rng(state["rng"], rng)
        start = state["step"]
    data = torch.randint(0, VOCAB, (N_DATA, SEQ), generator=torch.Generator().manual_seed(3))
    per_rank = GLOBAL_BATCH // info.world_size
    model.train()
    for _ in range(start, steps):
        idx = torch.from_numpy(rng.choice(N_DATA, size=GLOBAL_BATCH, replace=False))
        ids = data[idx[info.rank * per_rank:(info.rank + 1) * per_rank]]   # [b, SEQ]
        loss = -model_token_logprobs(model, ids).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(run_dir, steps, model=model, optimizer=opt, scheduler=sched, lora_cfg=LCFG,
                    trainer_state={"seen": steps * GLOBAL_BATCH}, config_text="",
                    rng=capture_rng(rng))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    train(info, out / "full", TOTAL, resume=False)
    train(info, out / "part", TOTAL // 2, resume=False)
    train(info, out / "part", TOTAL, resume=True)
    destroy_distributed(sync=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_process(0)
