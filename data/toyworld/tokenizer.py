"""A small byte-level BPE tokenizer trained on the toy problems, saved as an AutoTokenizer directory.

Pre-tokenization is exactly Qwen2's (NFC, its split regex: every digit its own piece, byte-level), so the model
reads and writes numbers one column at a time, and so the tokenizer gives the same ids whichever class loads it:
transformers 5 loads a model directory's tokenizer as Qwen2Tokenizer (from config.json's model_type), which
rebuilds the normalizer and pre-tokenizer in code and ignores tokenizer.json's. Special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos). <think> and
</think> are added as single tokens that are NOT special: vLLM decodes with skip_special_tokens=True and its
deepseek_r1 reasoning parser must still find both tags (by vocab id and in the text).
"""

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

CHAT_TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "chat_template.jinja"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
MODEL_MAX_LENGTH = 2048
TOKENIZER_VERSION = 2  # bump when training changes the ids (2: Qwen2's pre-tokenization, see above)
# Text the chat template and prompt templates add (role names, DeepSeek-R1's math instruction), so that it
# becomes tokens although no problem contains it; twice, because BPE merges only pairs seen >= 2 times.
SCAFFOLD = (
    "system\nuser\nassistant\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
)


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train BPE on `texts`; the vocabulary may stop short of vocab_size when no pair repeats."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
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
