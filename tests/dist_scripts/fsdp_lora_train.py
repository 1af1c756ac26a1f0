"""Three AdamW steps of LoRA-only training, one process or under torchrun (FSDP2, gloo).

Run as `python fsdp_lora_train.py OUT` (one process, the whole batch) or
`torchrun --nproc_per_node 2 fsdp_lora_train.py OUT` (each rank takes its half of the batch).
Writes OUT/adapter (PEFT format, gathered on rank 0) and OUT/losses.json.
"""

import json
import sys
from pathlib import Path

import torch

from minicd.algo.logprobs import model_token_logprobs
from minicd.algo.sft import sft_loss
from minicd.dist import destroy_distributed, exit_process, full_state_dict, init_distributed, shard_model, trainable_parameters
from minicd.model.hub import build_model
from minicd.model.lora import LoRAConfig, inject_lora, save_adapter
from minicd.model.hf_config import DecoderConfig

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 12, 96, 3


def tiny_config() -> DecoderConfig:
    return DecoderConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=True)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    model = build_model(tiny_config(), seed=0)
    lcfg = LoRAConfig(r=4, alpha=8.0)
    inject_lora(model, lcfg, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # nonzero B so every adapter tensor gets gradient from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    shard_model(model)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.01)

    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(GLOBAL_BATCH, SEQ - 1)
    mask[:, :4] = 0                                     # "prompt" targets masked
    mask[1, 8:] = 0                                     # ragged response lengths
    per_rank = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    global_tokens = float(mask.sum())
    losses = []
    for step in range(STEPS):
        ids = data[step, rows]
        logp = model_token_logprobs(model, ids)                      # [b, SEQ-1]
        # FSDP averages gradients over ranks, so scale the local sum by world size
        loss = sft_loss(logp, mask[rows], global_tokens / info.world_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone() / info.world_size
        if info.distributed:
            torch.distributed.all_reduce(total)
        losses.append(total.item())
    state = full_state_dict(model, trainable_only=True)
    if info.is_main:
        save_adapter(model, out / "adapter", lcfg, state_dict=state)
        (out / "losses.json").write_text(json.dumps(losses))
    destroy_distributed(sync=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_process(0)
