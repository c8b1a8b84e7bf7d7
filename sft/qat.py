"""Quantization-aware distillation: `qat: int8 | int4 | w8a8` in an sft recipe (full fine-tuning).

    python -m sft --config recipes/<x>/sft.yaml --qat int8

Before training, torchao's QATConfig (step "prepare") swaps every Linear layer but the output head for a
FakeQuantizedLinear: its forward rounds the weights (and, for w8a8, the activations, per token) to the
scheme's int8/int4 grid and passes the gradient straight through, so the student learns weights that
survive the rounding. Works with every loss sft has (CE, sparse or online KD): only the model changes.
After training, the float weights go to <output_dir> as usual (resumable; `python -m sft.quantize
--backend compressed-tensors` exports them for vLLM), and `convert` swaps the layers back and quantizes them
with the same torchao config `python -m sft.quantize --scheme <s>` uses, into <output_dir>/quantized/, which
transformers loads like any model. QAT and post-training quantization of one student therefore differ only
in the training.
"""

import json
import logging
import shutil
from pathlib import Path

import torch

from sft.quantize import SUMMARY, describe_dir, import_torchao, quantize, torchao_config

log = logging.getLogger(__name__)


def _not_head(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def fake_quantize_configs(scheme: str) -> dict:
    """QATConfig arguments whose rounding equals the PTQ config's. torchao infers them from the int4 and w8a8
    configs; Int8WeightOnlyConfig has no inferred QAT twin, so its grid is spelled out (symmetric int8 per
    output channel)."""
    import_torchao()
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if scheme == "int8":
        return {"weight_config": IntxFakeQuantizeConfig(torch.int8, granularity=PerAxis(0), is_symmetric=True)}
    return {"base_config": torchao_config(scheme)}


def prepare_qat(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(**fake_quantize_configs(scheme), step="prepare"), filter_fn=_not_head)
    swapped = sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    log.info("qat %s: %d Linear layers train through fake quantization (torchao QATConfig)", scheme, swapped)
    return model


def strip_fake_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """FakeQuantizedLinear back to Linear, weights untouched: what sft saves as its float model."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: type(m).__name__ == "FakeQuantizedLinear")
    return model


def save_converted(float_dir: Path, scheme: str) -> Path:
    """<float_dir>/quantized: the QAT-trained float weights quantized with the scheme's PTQ config, the same
    path as `python -m sft.quantize --scheme <scheme> --backend torchao`."""
    out = float_dir / "quantized"
    tmp = float_dir / ".quantized.tmp"
    quantize(str(float_dir), scheme, "torchao", tmp)
    summary = describe_dir(float_dir, tmp, scheme, "torchao") | {
        "method": "quantization-aware training (torchao QATConfig fake quantization), then round-to-nearest"}
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("qat %s: converted model %s (weights %.2f MiB -> %.2f MiB, stored %s)", scheme, out,
             summary["weights_bytes_before"] / 2**20, summary["weights_bytes_after"] / 2**20, summary["stored_dtypes"])
    return out
