"""One GPU check of long-trace training: a random student of Qwen2.5-1.5B's shape trained by the sft stage's own
trainers, then sampled by the evals stage's in-process engine. Under 8 minutes on one H200.

    python tests/gpu/check.py [--out gpu_check.json] [--lengths 4096 16384 32768] [--steps 3]
    python tests/gpu/check.py --tiny      # the same code and settings on a CPU: a tiny model, short examples (CI)

For full SFT (TRL's SFTTrainer: its fused, chunked LM head), LoRA (r 16 on every linear layer) and sparse KD
(DistillTrainer, top-20 synthetic teacher logprobs, kd_alpha 0.5) at each length: one example per row, padding-free
(position ids, no mask), bf16, gradient checkpointing (TRL's selective one by default: each layer's attention
output is kept, the rest recomputed), Liger's layer kernels and flash attention where installed (else sdpa); and
sft_packed: rows of the same length holding 4 examples (TRL's bfd packing, position ids restarting per example).

Per run: step time (the median of `--steps` steps after one warm-up step), tokens/s, MFU = 6 x parameters x
tokens / step time / the GPU's dense bf16 peak (PEAK_TFLOPS; LoRA by the same 6N convention; recomputation not
counted), beside it the same with causal attention's FLOPs added (mfu_with_attention), peak memory, and per length
the KD/SFT, LoRA/SFT and packed/SFT step-time ratios. A run out of memory is recorded as "oom", one that fails as
its error, and the others go on. Then the model, saved with a word-level tokenizer of its vocabulary, answers a
few prompts through tracegen's in-process engine as evals loads it (vllm when importable, else hf). Writes one
JSON, prints a table.

Targets (issue 19): full SFT at 16k MFU >= 40%; 32k trains without running out of memory; KD step <= 1.25x SFT;
LoRA faster than full.

Missing wheels (a bare GPU image lacks TRL, datasets, this project's transformers and Liger; about 15 MB, see
/work/.library/device/README.md on carrying wheels): `tests/gpu/wheels.sh download` here, with PyPI, into .whl/;
`tests/gpu/wheels.sh check [ARGS]` there installs them into /tmp/site and runs this script.
"""

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")
PEAK_TFLOPS = {  # dense bf16 tensor-core peak per GPU (data sheets, no sparsity); longest names first
    "B200": 2250, "H200": 989, "GH200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "H800": 989,
    "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "A10G": 70, "A10": 125, "L4": 121, "A6000": 155,
}
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
MODES = ("sft", "lora", "sparse_kd", "sft_packed")
TOP_K = 20
PACKED = 4  # sft_packed: this many examples of length / 4 tokens in each row (TRL's bfd packing)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    gpu = torch.cuda.is_available() and not args.tiny
    shape = TINY if args.tiny else QWEN25_15B
    liger = gpu and not args.no_liger and find_spec("liger_kernel") is not None
    report = {"device": device_report(gpu), "model": shape, "attn_implementation": attention(gpu), "liger": liger,
              "checkpointing": args.checkpointing, "steps": args.steps, "runs": []}
    log.info("device %s, attention %s", report["device"], report["attn_implementation"])
    # --- train: every mode at every length -----------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            for mode in MODES:
                run = train(mode, length, shape, args.steps, gpu, report, Path(tmp))
                report["runs"].append(run)
                log.info("%s", run)
        report["ratios"] = ratios(report["runs"])
        report["targets"] = targets(report["runs"], report["ratios"])
        # --- sample: the evals stage's in-process engine on the same model -------------------------------------
        try:
            report["engine"] = sample(shape, gpu, Path(tmp), prompts=4, tokens=8 if args.tiny else 32)
        except Exception as e:  # broad on purpose: the training figures above are kept and written
            log.exception("the in-process engine failed")
            report["engine"] = {"error": f"{type(e).__name__}: {e}"}
    # --- report ---------------------------------------------------------------------------------------------
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    log.info("wrote %s", args.out)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short examples, on the CPU")
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens per example (default 4096 16384 32768; "
                        "--tiny: 64 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run, after one warm-up")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--no-liger", action="store_true", help="leave Liger's kernels off even where installed")
    parser.add_argument("--checkpointing", choices=("selective", "full", "none"), default="selective",
                        help="gradient checkpointing: TRL's selective one (keeps each layer's attention output, "
                        "recomputes the rest), full, or none")
    args = parser.parse_args(argv)
    args.lengths = args.lengths or ([64, 256] if args.tiny else [4096, 16384, 32768])
    return args


# ----------------------------------------------------------------------------------------- the machine
def device_report(gpu: bool) -> dict:
    if not gpu:
        return {"name": "cpu", "peak_tflops": None, "memory_gib": None}
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    if peak is None:
        log.warning("%s is not in PEAK_TFLOPS: MFU is left out", name)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {"name": name, "peak_tflops": peak, "memory_gib": round(memory, 1), "torch": torch.__version__}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name() ('NVIDIA H100 80GB HBM3')."""
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in device_name), None)


def attention(gpu: bool) -> str:
    """flash_attention_2 where flash-attn is installed; else sdpa (one example per row: its causal kernel)."""
    return "flash_attention_2" if gpu and find_spec("flash_attn") else "sdpa"


def build_model(shape: dict, gpu: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape)
    with torch.device("cuda" if gpu else "cpu"):
        return Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation=attention(gpu))


# ----------------------------------------------------------------------------------------- training
def synthetic_rows(length: int, vocab: int, n: int, kd: bool):
    """n examples of `length` tokens (a prompt of length / 8 up to 256, the rest completion); with kd, the
    teacher's top-20 + rest at every completion position (a random distribution over 21 outcomes)."""
    import datasets

    rng = np.random.default_rng(0)
    prompt = min(256, length // 8)
    rows = []
    for _ in range(n):
        ids = rng.integers(3, vocab, length)
        row = {"input_ids": ids.tolist(), "labels": [-100] * prompt + ids[prompt:].tolist()}
        if kd:
            top = np.full((length, TOP_K), -1, np.int32)
            top[prompt:] = rng.integers(3, vocab, (length - prompt, TOP_K))  # a repeat is padded by the loss
            logits = rng.normal(0, 2, (length - prompt, TOP_K + 1))
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            top_logprobs = np.full((length, TOP_K), -np.inf, np.float16)
            top_logprobs[prompt:] = logp[:, :TOP_K]
            rest = np.full(length, -np.inf, np.float32)
            rest[prompt:] = logp[:, TOP_K]
            row |= {"teacher_top_ids": top, "teacher_top_logprobs": top_logprobs, "teacher_rest_logprobs": rest}
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def train(mode: str, length: int, shape: dict, steps: int, gpu: bool, report: dict, tmp: Path) -> dict:
    """One run: `length` tokens per row (one example, or PACKED for sft_packed); a failure is recorded, not
    raised, so the other runs still report."""
    run = {"mode": mode, "tokens_per_row": length, "examples_per_row": PACKED if mode == "sft_packed" else 1}
    model = trainer = None
    try:
        model = build_model(shape, gpu)
        run["parameters"] = model.num_parameters()
        trainer, times = make_trainer(mode, model, length, shape, steps, gpu, report, tmp / f"{mode}-{length}")
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
        run |= {"step_s": round(step_s, 4), "tokens_per_s": round(length / step_s, 1),
                "mfu": mfu(run["parameters"], length, step_s, report["device"]["peak_tflops"]),
                "mfu_with_attention": mfu(run["parameters"], length, step_s, report["device"]["peak_tflops"],
                                          attention_flops(shape, length // run["examples_per_row"])),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
                # what float32 [tokens, vocabulary] logits alone would hold: a peak below it shows none were built
                "full_logits_gib": round(length * shape["vocab_size"] * 4 / 2**30, 2)}
    except torch.OutOfMemoryError:
        run["result"] = "oom"
    except Exception as e:  # broad on purpose: the remaining runs are worth the GPU time already paid for
        log.exception("%s at %d tokens failed", mode, length)
        run |= {"result": "error", "error": f"{type(e).__name__}: {e}"}
    finally:
        del model, trainer
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    return run


def make_trainer(mode, model, length, shape, steps, gpu, report, out: Path):
    """The sft stage's trainer for the mode, and the list its callback fills with the time at each step's end."""
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft.config import DistillArguments
    from sft.trainer import DistillTrainer

    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    packing = mode == "sft_packed"
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=1, max_steps=1 + steps, learning_rate=1e-5,
                     padding_free=True, packing=packing, max_length=length if packing else None, bf16=True,
                     use_cpu=not gpu, gradient_checkpointing=report["checkpointing"] != "none",
                     gradient_checkpointing_kwargs={"selective": report["checkpointing"] == "selective"},
                     use_liger_kernel=report["liger"],
                     liger_kernel_config={"fused_linear_cross_entropy": False} if report["liger"] else None,
                     save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=0)
    per_row = PACKED if packing else 1
    rows = synthetic_rows(length // per_row, shape["vocab_size"], per_row * (1 + steps), kd=mode == "sparse_kd")
    tokenizer = word_tokenizer(shape["vocab_size"])
    common = dict(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[StepTimes()])
    if mode == "lora":
        return SFTTrainer(**common, peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")), times
    if mode in ("sft", "sft_packed"):
        return SFTTrainer(**common), times
    distill = DistillArguments(dataset="synthetic", kd="sparse", kd_alpha=0.5)
    return DistillTrainer(**common, distill=distill), times


def mfu(parameters: int, tokens: int, step_s: float, peak_tflops: float | None, extra_per_token: float = 0.0
        ) -> float | None:
    """(6 x parameters + extra FLOPs per token) x tokens / step time / peak."""
    if not peak_tflops:
        return None
    return round((6 * parameters + extra_per_token) * tokens / step_s / (peak_tflops * 1e12), 4)


def attention_flops(shape: dict, example_length: int) -> float:
    """Causal attention's FLOPs per token, forward and backward (PaLM's 12 x layers x width x length, halved by
    the causal mask), which 6N leaves out: about 45% more at 16k tokens for Qwen2.5-1.5B's shape."""
    return 6 * shape["num_hidden_layers"] * shape["hidden_size"] * example_length


def ratios(runs: list[dict]) -> dict:
    """Per row length: the step time of KD, LoRA and packed SFT over that of SFT (one example per row)."""
    by = {(r["mode"], r["tokens_per_row"]): r.get("step_s") for r in runs}
    out = {}
    for length in sorted({r["tokens_per_row"] for r in runs}):
        sft = by[("sft", length)]
        out[str(length)] = {f"{mode}/sft": round(by[(mode, length)] / sft, 3) if sft and by[(mode, length)]
                            else None for mode in MODES[1:]}
    return out


def targets(runs: list[dict], ratios_by_length: dict) -> dict:
    """Issue 19's targets, each true / false, or None where this check did not measure it."""
    def run(mode, length):
        return next((r for r in runs if r["mode"] == mode and r["tokens_per_row"] == length), None)

    sft_16k, at_32k = run("sft", 16384), [r for r in runs if r["tokens_per_row"] == 32768]
    kd = [r["sparse_kd/sft"] for r in ratios_by_length.values()]
    lora = [r["lora/sft"] for r in ratios_by_length.values()]
    return {
        "sft_16k_mfu_at_least_40%": None if not sft_16k or sft_16k.get("mfu") is None else sft_16k["mfu"] >= 0.40,
        "32k_trains_without_oom": all("result" not in r for r in at_32k) if at_32k else None,
        "kd_step_at_most_1.25x_sft": None if None in kd or not kd else max(kd) <= 1.25,
        "lora_faster_than_full": None if None in lora or not lora else max(lora) < 1.0,
    }


# ----------------------------------------------------------------------------------------- sampling
def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per id of the model's vocabulary (no hub) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}w0 {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}w0 {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w1", pad_token="w2", eos_token="w2",
                                   chat_template=template)


def sample(shape: dict, gpu: bool, tmp: Path, prompts: int, tokens: int) -> dict:
    """The model saved with its tokenizer, loaded by tracegen's in-process engine (evals' engine: vllm or hf) and
    asked `prompts` prompts, greedy, `tokens` new tokens each."""
    from tracegen.config import TracegenConfig

    path = tmp / "student"
    model = build_model(shape, gpu)
    model.save_pretrained(path)
    word_tokenizer(shape["vocab_size"]).save_pretrained(path)
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    engine = "vllm" if gpu and find_spec("vllm") else "hf"
    kwargs = {"max_model_len": 4096, "gpu_memory_utilization": 0.5, "enforce_eager": True} if engine == "vllm" \
        else {"device_map": "cuda"} if gpu else {}
    problems = tmp / "problems.jsonl"
    problems.write_text("")
    cfg = TracegenConfig(engine=engine, model=str(path), engine_kwargs=kwargs, problems=str(problems),
                         output_dir=str(tmp / "generations"), temperature=0.0, max_tokens=tokens, seed=0)
    if engine == "vllm":
        from tracegen.vllm_engine import VllmEngine as Engine
    else:
        from tracegen.hf_engine import HfEngine as Engine
    start = time.perf_counter()
    loaded = Engine(cfg)
    load_s = time.perf_counter() - start
    requests = [([{"role": "user", "content": " ".join(f"w{3 + i + j}" for j in range(16))}], 1)
                for i in range(prompts)]
    start = time.perf_counter()
    responses = loaded.generate_batch(requests)
    generate_s = time.perf_counter() - start
    generated = sum(s.completion_tokens for r in responses for s in r.samples)
    return {"engine": engine, "prompts": len(responses), "completion_tokens": generated,
            "load_s": round(load_s, 1), "generate_s": round(generate_s, 2),
            "tokens_per_s": round(generated / generate_s, 1)}


# ----------------------------------------------------------------------------------------- the table
def print_table(report: dict) -> None:
    device = report["device"]
    print(f"\n{device['name']} (peak {device['peak_tflops']} TFLOP/s bf16), attention {report['attn_implementation']},"
          f" liger {report['liger']}, checkpointing {report['checkpointing']}")
    print(f"{'mode':<11}{'row':>8}{'examples':>10}{'step s':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for r in report["runs"]:
        head = f"{r['mode']:<11}{r['tokens_per_row']:>8}{r['examples_per_row']:>10}"
        if "result" in r:
            print(f"{head}  {'out of memory' if r['result'] == 'oom' else r['error'][:80]}")
            continue
        mfu_text = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(f"{head}{r['step_s']:>10.3f}{r['tokens_per_s']:>12,.0f}{mfu_text:>8}{memory:>10}")
    for length, ratio in report["ratios"].items():
        print(f"{length:>8} tokens: KD/SFT step {_ratio(ratio['sparse_kd/sft'])}, LoRA/SFT step "
              f"{_ratio(ratio['lora/sft'])}, packed/SFT step {_ratio(ratio['sft_packed/sft'])}")
    print("targets: " + ", ".join(f"{name} {value}" for name, value in report["targets"].items()))
    e = report["engine"]
    if "error" in e:
        print(f"engine failed: {e['error'][:200]}")
        return
    print(f"engine {e['engine']}: {e['prompts']} prompts, {e['completion_tokens']} tokens in {e['generate_s']} s "
          f"(loaded in {e['load_s']} s)")


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
