"""A small byte-level BPE tokenizer trained on the toy problems, saved as an AutoTokenizer directory.

Numbers are split into single digits before BPE (as Qwen2's tokenizer does), so the model reads and writes
them one column at a time. Special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos). <think> and
</think> are added as single tokens that are NOT special: vLLM decodes with skip_special_tokens=True and its
deepseek_r1 reasoning parser must still find both tags (by vocab id and in the text).
"""

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "chat_template.jinja"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
MODEL_MAX_LENGTH = 2048
# GPT-2's split pattern, except that each digit is its own piece (with the space before it, if any).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text the chat template and prompt templates add (role names, DeepSeek-R1's math instruction), so that it
# becomes tokens although no problem contains it; twice, because BPE merges only pairs seen >= 2 times.
SCAFFOLD = (
    "system\nuser\nassistant\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
)


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train BPE on `texts`; the vocabulary may stop short of vocab_size when no pair repeats."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: exact round trips
        show_progress=False,
    )
    tok.train_from_iterator([SCAFFOLD, SCAFFOLD, *texts], trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) must give x back
    )
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text()
    return tokenizer


def corpus(problems: list[dict]) -> list[str]:
    """What the tokenizer learns from: every prompt and gold solution."""
    return [text for p in problems for text in (p["prompt"], p["meta"]["solution"])]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every loader looks.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
