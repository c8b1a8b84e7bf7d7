"""qat in python -m sft: the student trains through torchao's fake quantization (the loss falls, the weights
change), the float model is saved as a plain checkpoint, and quantized/ holds the converted int8 model, whose
outputs equal the fake-quantized model's (the rounding learnt is the rounding deployed) and which equals
post-training quantization of the same trained weights."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft.main import main
from sft.qat import prepare_qat
from sft.quantize import main as quantize


def test_qat_trains_through_fake_quantization_and_converts(toyworld, curated, tmp_path):
    out = tmp_path / "qat"
    assert main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir", str(out),
                 "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "1",
                 "--max_steps", "10", "--save_strategy", "no", "--seed", "0", "--qat", "int8"]) == 0
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    before, after = load_file(str(toyworld.student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)  # a plain checkpoint: no fake-quantizer state
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])

    converted = out / "quantized"
    summary = json.loads((converted / "quantize.json").read_text())
    assert summary["stored_dtypes"] == {"I8": 14} and summary["method"].startswith("quantization-aware training")
    assert summary["weights_bytes_after"] < 0.5 * summary["weights_bytes_before"]
    deployed = AutoModelForCausalLM.from_pretrained(converted)
    assert deployed.model.layers[0].self_attn.q_proj.weight.qdata.dtype == torch.int8
    fake = prepare_qat(AutoModelForCausalLM.from_pretrained(out), "int8")
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        assert torch.allclose(fake(ids).logits, deployed(ids).logits, atol=1e-4)

    # post-training quantization of the same trained weights is the same model
    assert quantize(["--model", str(out), "--output_dir", str(tmp_path / "ptq"), "--scheme", "int8"]) == 0
    ptq = AutoModelForCausalLM.from_pretrained(tmp_path / "ptq")
    with torch.no_grad():
        assert torch.equal(ptq(ids).logits, deployed(ids).logits)


def test_qat_is_refused_with_lora(toyworld, curated, tmp_path, caplog):
    assert main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir",
                 str(tmp_path), "--qat", "int8", "--use_peft", "true"]) == 2
    assert "qat: needs full fine-tuning (use_peft: false)" in caplog.text
    assert main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir",
                 str(tmp_path), "--qat", "int3"]) == 2
    assert "qat: 'int3' is not one of: none, int8, int4, w8a8" in caplog.text
