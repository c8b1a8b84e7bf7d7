"""python -m sft.prune --config recipes/<x>/prune.yaml [--field value ...]

Prune, then distil (Minitron, Muralidharan et al. 2024): make a student by pruning a teacher, then train it with
`python -m sft` (logit KD from the teacher). Importance is measured on calibration text in one pass of the teacher:
- depth: block influence (ShortGPT), 1 - cos(a layer's input, its output) averaged over tokens; the layers that
  change their input least are dropped (num_layers);
- attention heads: the RMS over tokens of each head's output (the input of o_proj); whole key/value groups are kept
  or dropped (the sum over their query heads), so GQA stays GQA (num_key_value_heads);
- MLP channels: the RMS of each channel's activation (the input of down_proj) (intermediate_size);
- embedding channels: the RMS of every RMSNorm's output per channel, summed over the norms (hidden_size).
Writes <output_dir>/ as a normal checkpoint (safetensors, config.json with the new sizes, tokenizer,
generation_config) that transformers and vLLM load, and prune_report.json: parameters before and after, what was
kept and each importance, the calibration LM loss before and after. The directory is written aside and renamed
into place; a rerun with the same settings does nothing. Exit codes: 0 done (or already done), 2 a config error
(named).

Why not NVIDIA Model Optimizer: nvidia-modelopt 0.47 installs here, but its Minitron pruning (mode mcore_minitron)
works on Megatron-Core models only (it imports megatron.core and Transformer Engine); for transformers models it
offers FastNAS, a search for vision networks. The same importance criteria, on a transformers Llama-style decoder,
are a hundred lines of slicing here. Supported: Llama, Qwen2, Qwen3, Mistral layouts (q/k/v/o, gate/up/down,
RMSNorm); others are refused.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.config import ConfigError, documented, run_command
from data.config import parse_config as parse

log = logging.getLogger("sft.prune")
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
# vLLM's Qwen2 derives head_dim as hidden_size / num_attention_heads and ignores config.head_dim (vLLM 0.32)
DERIVED_HEAD_DIM = ("qwen2",)



@dataclass
class PruneArguments:
    model: str | None = documented("The model to prune (usually the teacher): a model directory or hub name.",
                              default=None)
    output_dir: str | None = documented("Where the pruned checkpoint goes.", default=None)
    calibration: str | None = documented(
        "Calibration text: a curated folder or parquet file (`messages`, rendered with the chat template) or a "
        "problems .jsonl (`prompt` as a user turn).", default=None)
    calibration_samples: int = documented("How many calibration rows (the first ones).", default=64)
    calibration_max_length: int = documented("Tokens per calibration row at most (longer rows are cut).", default=512)
    batch_size: int = documented("Calibration rows per forward pass.", default=8)
    num_layers: int | None = documented("Decoder layers to keep (depth pruning). Default: all.", default=None)
    num_key_value_heads: int | None = documented(
        "Key/value heads to keep per layer, each with its query heads (width). Default: all.", default=None)
    intermediate_size: int | None = documented("MLP channels to keep per layer (width). Default: all.", default=None)
    hidden_size: int | None = documented("Embedding channels to keep (width). Default: all.", default=None)

    def __post_init__(self):
        for name in ("model", "output_dir", "calibration"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        for name in ("calibration_samples", "calibration_max_length", "batch_size", "num_layers",
                     "num_key_value_heads", "intermediate_size", "hidden_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_config(argv)
        log.info("resolved config:\n%s", json.dumps(asdict(args), indent=2))
        out = Path(args.output_dir)
        if already_done(out, args):
            log.info("%s already holds this pruned model (prune_report.json); nothing to do", out)
            return 0
        # --- load the model and the calibration text -------------------------------------------------------
        model, tokenizer = load(args.model)
        check_targets(model.config, args)
        batches = calibration_batches(args, tokenizer)
        # --- measure importance, choose what stays --------------------------------------------------------
        scores = importance(model, batches)
        keep = choose(model.config, scores, args)
        # --- cut, check, write ----------------------------------------------------------------------------
        pruned = pruned_model(model, keep)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    tmp = out.with_name(out.name + ".tmp")  # complete or absent: written aside, renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    pruned.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {
        "config": asdict(args), "parameters_before": count(model), "parameters_after": count(pruned),
        "calibration": {"source": args.calibration, "rows": sum(len(b["input_ids"]) for b in batches),
                        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
                        "loss_before": lm_loss(model, batches), "loss_after": lm_loss(pruned, batches)},
        **keep.describe(scores),
    }
    report["parameter_ratio"] = round(report["parameters_after"] / report["parameters_before"], 4)
    (tmp / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("pruned %s: %s -> %s parameters (%.1f%%), layers kept %s, calibration loss %.3f -> %.3f -> %s",
             args.model, f"{report['parameters_before']:,}", f"{report['parameters_after']:,}",
             100 * report["parameter_ratio"], keep.layers, report["calibration"]["loss_before"],
             report["calibration"]["loss_after"], out)
    return 0


def already_done(out: Path, args: PruneArguments) -> bool:
    """True when out/ holds a pruned model of these settings; another one there is refused, not overwritten."""
    report = out / "prune_report.json"
    if not out.exists():
        return False
    if not report.is_file():
        raise ConfigError(f"output_dir: {out} exists and is not a pruned model (no prune_report.json); choose another")
    made = json.loads(report.read_text()).get("config")
    if made != asdict(args):
        differ = sorted(k for k in asdict(args) if (made or {}).get(k) != asdict(args)[k])
        raise ConfigError(f"output_dir: {out} holds a model pruned with other settings ({', '.join(differ)}); "
                          "choose another output_dir or remove it")
    return True


def parse_config(argv: list[str] | None) -> PruneArguments:
    (args,) = parse([PruneArguments], argv, "python -m sft.prune")
    return args


def count(model) -> int:
    """Distinct parameters (a tied embedding and LM head counted once), as num_parameters() counts them."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- loading
def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"model: cannot load {name!r}: {e}") from None
    if model.config.model_type not in SUPPORTED:
        raise ConfigError(f"model: {name} is a {model.config.model_type} model; sft.prune knows the Llama-style "
                          f"layouts of {', '.join(SUPPORTED)}")
    model.eval()
    return model, tokenizer


def calibration_batches(args: PruneArguments, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of calibration token ids with their attention masks."""
    rows = _calibration_rows(Path(args.calibration), args.calibration_samples)
    ids = []
    for row in rows:
        if row.get("messages"):
            messages, generation_prompt = list(row["messages"]), False
        elif row.get("prompt"):
            messages, generation_prompt = [{"role": "user", "content": row["prompt"]}], True
        else:
            raise ConfigError(f"calibration: {args.calibration}: a row has neither `messages` nor `prompt`")
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                               return_dict=False)
        ids.append(list(tokens)[: args.calibration_max_length])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(ids), args.batch_size):
        chunk = ids[start:start + args.batch_size]
        length = max(map(len, chunk))
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, row in enumerate(chunk):
            input_ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def _calibration_rows(path: Path, n: int) -> list[dict]:
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ConfigError(f"calibration: no such file: {path}")
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(rows) == n:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"calibration: {path}:{number}: not JSON: {e}") from None
    else:
        import pyarrow.dataset as pads

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.is_file() else []
        if not files:
            raise ConfigError(f"calibration: {path} is not a .jsonl file, a parquet file or a folder of them")
        rows = pads.dataset([str(f) for f in files], format="parquet").head(n).to_pylist()
    if not rows:
        raise ConfigError(f"calibration: {path} has no rows")
    return rows


# ---------------------------------------------------------------------------------------- importance
@torch.no_grad()
def importance(model, batches) -> dict[str, torch.Tensor]:
    """One pass over the calibration batches: per layer its block influence [L], head output RMS [L, H], MLP
    channel RMS [L, I]; embedding channel importance [hidden]."""
    config, layers = model.config, model.model.layers
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    sums = {"influence": torch.zeros(len(layers), dtype=torch.float64),
            "heads": torch.zeros(len(layers), heads, dtype=torch.float64),
            "channels": torch.zeros(len(layers), config.intermediate_size, dtype=torch.float64),
            "hidden": torch.zeros(config.hidden_size, dtype=torch.float64)}
    current = {}  # the batch's mask of real tokens, flattened

    def tokens(x):  # [B, T, ...] -> [real tokens, ...] in float64
        return x.reshape(-1, *x.shape[2:])[current["mask"]].double()

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums["influence"][i] += (1 - torch.cosine_similarity(tokens(x), tokens(y), dim=-1)).sum()
        return hook

    def on_heads(i):
        def hook(module, args):
            h = tokens(args[0]).reshape(-1, heads, head_dim)
            sums["heads"][i] += h.square().sum(-1).sum(0)
        return hook

    def on_channels(i):
        def hook(module, args):
            sums["channels"][i] += tokens(args[0]).square().sum(0)
        return hook

    def on_norm(module, args, output):
        sums["hidden"] += tokens(output).square().sum(0)

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.register_forward_hook(on_layer(i), with_kwargs=True),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)),
                    layer.mlp.down_proj.register_forward_pre_hook(on_channels(i)),
                    layer.input_layernorm.register_forward_hook(on_norm),
                    layer.post_attention_layernorm.register_forward_hook(on_norm)]
    handles.append(model.model.norm.register_forward_hook(on_norm))
    n = 0
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].reshape(-1).bool()
            n += int(current["mask"].sum())
            model.model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {"influence": sums["influence"] / n, "heads": (sums["heads"] / n).sqrt(),
            "channels": (sums["channels"] / n).sqrt(), "hidden": sums["hidden"].sqrt()}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------------------- choosing
@dataclass
class Keep:
    """What stays, as indices into the original model (sorted, so the kept units keep their order)."""

    layers: list[int]
    kv_groups: dict[int, list[int]]  # per kept layer
    channels: dict[int, list[int]]
    hidden: list[int]
    group_size: int
    head_dim: int

    def query_rows(self, layer: int) -> torch.Tensor:
        heads = [g * self.group_size + j for g in self.kv_groups[layer] for j in range(self.group_size)]
        return _rows(heads, self.head_dim)

    def kv_rows(self, layer: int) -> torch.Tensor:
        return _rows(self.kv_groups[layer], self.head_dim)

    def describe(self, scores) -> dict:
        return {"layers_kept": self.layers, "block_influence": [round(v, 6) for v in scores["influence"].tolist()],
                "kv_groups_kept": {str(i): g for i, g in self.kv_groups.items()},
                "intermediate_size": len(next(iter(self.channels.values()))), "hidden_size": len(self.hidden),
                "num_key_value_heads": len(next(iter(self.kv_groups.values())))}


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + k for u in units for k in range(size)], dtype=torch.long)


def check_targets(config, args: PruneArguments) -> None:
    """Refuse, before any work, sizes the model does not have or a checkpoint vLLM would misread."""
    group = config.num_attention_heads // config.num_key_value_heads
    targets = {"num_layers": (args.num_layers, config.num_hidden_layers),
               "num_key_value_heads": (args.num_key_value_heads, config.num_key_value_heads),
               "intermediate_size": (args.intermediate_size, config.intermediate_size),
               "hidden_size": (args.hidden_size, config.hidden_size)}
    for name, (want, have) in targets.items():
        if want is not None and want > have:
            raise ConfigError(f"{name}: {want} is more than the model's {have}")
    hidden = args.hidden_size or config.hidden_size
    heads = (args.num_key_value_heads or config.num_key_value_heads) * group
    if config.model_type in DERIVED_HEAD_DIM and hidden != heads * _head_dim(config) \
            and (args.hidden_size or args.num_key_value_heads):
        raise ConfigError(
            f"num_key_value_heads / hidden_size: vLLM's {config.model_type} takes head_dim as hidden_size / "
            f"num_attention_heads, so {heads} heads of {_head_dim(config)} need hidden_size "
            f"{heads * _head_dim(config)}, not {hidden}; prune both together")


def choose(config, scores: dict[str, torch.Tensor], args: PruneArguments) -> Keep:
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    group = config.num_attention_heads // kv_heads
    hidden = args.hidden_size or config.hidden_size
    kv = args.num_key_value_heads or kv_heads
    kept_layers = _top(scores["influence"], args.num_layers or layers)
    groups = scores["heads"].reshape(layers, kv_heads, group).sum(-1)
    return Keep(layers=kept_layers, kv_groups={i: _top(groups[i], kv) for i in kept_layers},
                channels={i: _top(scores["channels"][i], args.intermediate_size or config.intermediate_size)
                          for i in kept_layers},
                hidden=_top(scores["hidden"], hidden), group_size=group, head_dim=_head_dim(config))


def _top(values: torch.Tensor, k: int) -> list[int]:
    """The indices of the k largest values, in their original order (ties: the earlier one)."""
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return sorted(order[:k])


# ---------------------------------------------------------------------------------------- cutting
@torch.no_grad()
def pruned_model(model, keep: Keep):
    """A new model of the pruned config, every tensor sliced from the original's."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep.layers)
    config.num_key_value_heads = len(keep.kv_groups[keep.layers[0]])
    config.num_attention_heads = config.num_key_value_heads * keep.group_size
    config.intermediate_size = len(keep.channels[keep.layers[0]])
    config.hidden_size = len(keep.hidden)
    config.head_dim = keep.head_dim
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[i] for i in keep.layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, config.num_hidden_layers)
    pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source = dict(model.state_dict())
    for name, tensor in pruned.state_dict().items():
        cut = _cut(name, source, keep)
        if cut.shape != tensor.shape:
            raise AssertionError(f"{name}: sliced {tuple(cut.shape)} for {tuple(tensor.shape)}")
        tensor.copy_(cut)
    pruned.generation_config = model.generation_config
    return pruned.eval()


def _cut(name: str, source: dict[str, torch.Tensor], keep: Keep) -> torch.Tensor:
    hidden = torch.tensor(keep.hidden)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return source[name][:, hidden]
    if name == "model.norm.weight":
        return source[name][hidden]
    prefix, _, rest = name.partition("model.layers.")
    index, _, part = rest.partition(".")
    if prefix or not part:
        raise ConfigError(f"model: sft.prune does not know the parameter {name}")
    layer = keep.layers[int(index)]
    t = source[f"model.layers.{layer}.{part}"]
    q, kv = keep.query_rows(layer), keep.kv_rows(layer)
    channels = torch.tensor(keep.channels[layer])
    rules = {
        "input_layernorm.weight": lambda: t[hidden], "post_attention_layernorm.weight": lambda: t[hidden],
        "self_attn.q_proj.weight": lambda: t[q][:, hidden], "self_attn.q_proj.bias": lambda: t[q],
        "self_attn.k_proj.weight": lambda: t[kv][:, hidden], "self_attn.k_proj.bias": lambda: t[kv],
        "self_attn.v_proj.weight": lambda: t[kv][:, hidden], "self_attn.v_proj.bias": lambda: t[kv],
        "self_attn.o_proj.weight": lambda: t[hidden][:, q], "self_attn.o_proj.bias": lambda: t[hidden],
        "self_attn.q_norm.weight": lambda: t, "self_attn.k_norm.weight": lambda: t,  # per head_dim (Qwen3)
        "mlp.gate_proj.weight": lambda: t[channels][:, hidden], "mlp.gate_proj.bias": lambda: t[channels],
        "mlp.up_proj.weight": lambda: t[channels][:, hidden], "mlp.up_proj.bias": lambda: t[channels],
        "mlp.down_proj.weight": lambda: t[hidden][:, channels], "mlp.down_proj.bias": lambda: t[hidden],
    }
    if part not in rules:
        raise ConfigError(f"model: sft.prune does not know the parameter {name}")
    return rules[part]()


@torch.no_grad()
def lm_loss(model, batches) -> float:
    """Mean next-token cross-entropy over the calibration tokens."""
    total, n = 0.0, 0
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        n += int((target != -100).sum())
    return round(total / max(n, 1), 4)


if __name__ == "__main__":
    run_command(main, "sft.prune", "nothing was written to output_dir")
