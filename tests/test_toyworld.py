"""The toy world: problems are deterministic and correct, the tokenizer round-trips, the chat template renders
and masks exactly as documented, and the initial models load like hub models.

    .venv/bin/python -m pytest -q tests/test_toyworld.py
"""

import ast
import json
import operator
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.toyworld import build, generate_problems, gold_conversation, gold_message, read_jsonl
from data.toyworld.problems import to_jsonl

PLACES = ["ones", "tens", "hundreds", "thousands"]

PROBLEM = "Ada has 47 apples. Ada buys 38 more apples. How many apples does Ada have now?"
REASONING = "47+38\nones: 7+8=15, write 5 carry 1\ntens: 4+3+1=8\n47+38=85"
CONTENT = "The answer is \\boxed{85}."
ASSISTANT_PART = f"<think>\n{REASONING}\n</think>\n\n{CONTENT}<|im_end|>"
PROMPT_PART = f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
RENDERED = PROMPT_PART + ASSISTANT_PART + "\n"


@pytest.fixture(scope="module")
def world(toyworld):
    """The session's toy world (tests/conftest.py)."""
    return toyworld


@pytest.fixture(scope="module")
def recipe(world):
    """The arguments it was built with."""
    manifest = json.loads(world.manifest.read_text())
    return {k: manifest[k] for k in ("seed", "n_train", "n_test")}


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world.tokenizer)


@pytest.fixture(scope="module")
def problems(world):
    return read_jsonl(world.train) + read_jsonl(world.test)


# ---------------------------------------------------------------- an independent checker for the gold working

ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Integer +, -, * and parentheses, evaluated by Python's parser (not the generator's code)."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            return ARITHMETIC[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def check_block(lines: list[str]) -> int:
    """One step: "a op b", a line per column, "a op b=r". Checks every claim; returns r."""
    head = re.fullmatch(r"(\d+)([+\-*])(\d+)", lines[0])
    assert head, f"not a step head: {lines[0]!r}"
    a, b = head[1], head[3]
    result = evaluate(lines[0])
    assert lines[-1] == f"{lines[0]}={result}"
    written = []
    for i, line in enumerate(lines[1:-1]):
        place, _, work = line.partition(": ")
        assert place == PLACES[i], line
        top_digit = int(a[::-1][i]) if i < len(a) else 0
        assert int(re.match(r"\d+", work)[0]) == top_digit, f"column {i} of {a} is not in {line!r}"
        for expr, value in re.findall(r"([\d+\-*]+)=(\d+)", work):
            assert evaluate(expr) == int(value), line
        if "is below 0" in work:
            assert evaluate(work.split(" ")[0]) < 0, line
        write = re.search(r"write (\d) carry (\d)", work)
        value = int(re.findall(r"=(\d+)", work)[-1])
        if write:
            assert (int(write[1]), int(write[2])) == (value % 10, value // 10), line
        written.append(write[1] if write else str(value))
    assert len(written) == max(len(a), len(b) if head[2] == "+" else 0), f"wrong number of columns in {lines}"
    assert int(written[-1] + "".join(reversed(written[:-1]))) == result, (
        f"columns do not spell {result}: {lines}"
    )
    return result


def check_solution(problem: dict) -> None:
    *working, last = problem["meta"]["solution"].split("\n")
    assert last == f"The answer is \\boxed{{{problem['answer']}}}."
    heads = [i for i, line in enumerate(working) if re.fullmatch(r"\d+[+\-*]\d+", line)]
    blocks = [working[i:j] for i, j in zip(heads, [*heads[1:], len(working)], strict=True)]
    assert heads[0] == 0 and len(blocks) == {1: 1, 2: 1, 3: 1, 4: 2, 5: 3}[problem["meta"]["difficulty"]]
    results = [check_block(block) for block in blocks]
    assert results[-1] == int(problem["answer"])


# ---------------------------------------------------------------- problems


def test_generator_is_deterministic():
    first = generate_problems(seed=0, n_train=200, n_test=40)
    again = generate_problems(seed=0, n_train=200, n_test=40)
    other = generate_problems(seed=1, n_train=200, n_test=40)
    for split in ("train", "test"):
        assert to_jsonl(first[split]) == to_jsonl(again[split])
        assert to_jsonl(first[split]) != to_jsonl(other[split])


def test_problems_are_well_formed_and_splits_disjoint(world, recipe, problems):
    train, test = read_jsonl(world.train), read_jsonl(world.test)
    assert (len(train), len(test)) == (recipe["n_train"], recipe["n_test"])
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert len({p["id"] for p in problems}) == len({p["prompt"] for p in problems}) == len(problems)
    for split, records in (("train", train), ("test", test)):
        assert [p["meta"]["difficulty"] for p in records[:10]] == [1, 2, 3, 4, 5] * 2
        for p in records:
            assert set(p) == {"id", "domain", "prompt", "answer", "tests", "source", "meta"}
            assert (p["domain"], p["tests"], p["source"], p["meta"]["split"]) == (
                "math",
                None,
                "toyworld",
                split,
            )
            assert p["id"].startswith(f"toy-{split}-") and p["answer"].isdigit()


def test_answers_match_the_story_and_the_working(problems):
    for p in problems:
        expression = p["meta"]["expression"]
        numbers = lambda text: sorted(int(n) for n in re.findall(r"\d+", text))  # noqa: E731
        assert numbers(p["prompt"]) == numbers(expression), f"{p['id']}: story and expression disagree"
        assert evaluate(expression) == int(p["answer"]), p["id"]
        check_solution(p)


def test_gold_message_splits_reasoning_from_answer(problems):
    p = problems[0]
    message = gold_message(p)
    assert message["role"] == "assistant"
    assert message["content"] == f"The answer is \\boxed{{{p['answer']}}}."
    assert message["reasoning_content"] + "\n" + message["content"] == p["meta"]["solution"]
    assert gold_conversation(p) == [{"role": "user", "content": p["prompt"]}, message]
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p["prompt"] + "\nThink."}]
    assert gold_conversation(p, sent) == [*sent, message]


def test_gold_sft_set_is_the_train_split_in_the_curated_format(world, tokenizer):
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(world.gold), split="train")
    train = read_jsonl(world.train)
    assert rows["problem_id"] == [p["id"] for p in train]
    for row, problem in zip(rows, train, strict=True):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert text.endswith(f"<think>\n{problem['meta']['solution']}<|im_end|>\n".replace(
            "\nThe answer", "\n</think>\n\nThe answer"))


# ---------------------------------------------------------------- the pretraining corpus


@pytest.fixture(scope="module")
def corpus(world):
    import pyarrow.parquet as pq

    return pq.read_table(world.corpus).to_pylist()


def corpus_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def test_corpus_holds_no_held_out_problem_or_its_working(world, corpus):
    from data.toyworld.corpus import steps_of
    from data.toyworld.problems import working

    text = "\n\n".join(corpus_text(row) for row in corpus)
    for problem in read_jsonl(world.test):
        assert problem["prompt"] not in text, problem["id"]
        assert problem["meta"]["solution"].rpartition("\n")[0] not in text, problem["id"]
        for step in steps_of(problem):  # not even one step of it, worked
            assert "\n".join(working(step)) + "\n" not in text + "\n", (problem["id"], step)
    assert "The answer is" not in text and "<think>" not in text  # no solution of any kind, no reasoning format


def test_corpus_teaches_reading_copying_and_columns(world, corpus):
    kinds = {kind: [r for r in corpus if r["kind"] == kind] for kind in ("story", "exercise", "chain")}
    assert len(corpus) == sum(map(len, kinds.values()))
    train = {p["id"]: p for p in read_jsonl(world.train)}
    assert sorted(r["problem_id"] for r in kinds["story"]) == sorted(train)
    assert len(kinds["exercise"]) == len(train) and len(kinds["chain"]) == len(train) // 2
    for row in kinds["story"]:  # the plan copies the story's numbers (a*b as the gold writes it), its operators
        user, assistant = row["messages"]
        problem = train[row["problem_id"]]
        assert (user["role"], user["content"], assistant["role"]) == ("user", problem["prompt"], "assistant")
        assert sorted(re.findall(r"\d+", assistant["content"])) == sorted(re.findall(r"\d+", problem["prompt"]))
        assert assistant["content"].split("\n")[0] == problem["meta"]["solution"].split("\n")[0]
        assert re.findall(r"[+\-*]", assistant["content"]) == re.findall(r"[+\-*]", problem["meta"]["expression"])
    for row in kinds["exercise"]:  # one step asked, answered with correct column working in the gold format
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        lines = assistant["content"].split("\n")
        assert lines[0] == user["content"]
        check_block(lines)
    for row in kinds["chain"]:
        check_chain(row)


def check_chain(row: dict) -> None:
    """A plan of 2-4 operations, then every step worked, each later one on the previous result and the plan's next
    operator and number: the working of a multi-step solution, without its story or answer line."""
    user, assistant = row["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    first, *later = user["content"].split("\n")
    lines = assistant["content"].split("\n")
    heads = [i for i, line in enumerate(lines) if re.fullmatch(r"\d+[+\-*]\d+", line)]
    assert heads[0] == 0 and 2 <= len(heads) <= 4 and len(later) == len(heads) - 1
    blocks = [lines[i:j] for i, j in zip(heads, [*heads[1:], len(lines)], strict=True)]
    assert blocks[0][0] == first
    total = check_block(blocks[0])
    for block, step in zip(blocks[1:], later, strict=True):
        assert block[0] == f"{total}{step}", (block[0], total, step)
        total = check_block(block)


def test_corpus_is_deterministic_for_a_seed():
    from data.toyworld.corpus import corpus_parquet, corpus_rows

    splits = generate_problems(seed=0, n_train=200, n_test=40)
    first = corpus_parquet(corpus_rows(splits["train"], splits["test"], seed=0))
    assert corpus_parquet(corpus_rows(splits["train"], splits["test"], seed=0)) == first
    assert corpus_parquet(corpus_rows(splits["train"], splits["test"], seed=1)) != first


def test_corpus_renders_for_sft_with_every_token_trained(corpus, tokenizer):
    """sft (assistant_only_loss: false) trains on the whole rendering, the user turn included."""
    for row in corpus[:50]:
        messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.endswith(f"<|im_start|>assistant\n{messages[-1]['content']}<|im_end|>\n")
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_the_corpus(tokenizer, problems):
    texts = [t for p in problems for t in (p["prompt"], p["meta"]["solution"])]
    texts += [tokenizer.apply_chat_template(gold_conversation(p), tokenize=False) for p in problems[:50]]
    ids = tokenizer(texts)["input_ids"]
    assert tokenizer.batch_decode(ids) == texts
    assert (
        tokenizer.decode(tokenizer.encode("5 + émoji ✓ \t x")) == "5 + émoji ✓ \t x"
    )  # byte-level: any text


def test_special_and_think_tokens(tokenizer):
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for tag in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(tag)) == 1 and tag in tokenizer.get_vocab()
    # vLLM decodes with skip_special_tokens=True; its deepseek_r1 parser must still see the tags.
    ids = tokenizer.encode("<think>\n1+1=2\n</think>\n\nok<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n1+1=2\n</think>\n\nok"
    for token in tokenizer.get_vocab():  # numbers are read one digit at a time
        assert sum(c.isdigit() for c in token) <= 1, token


# ---------------------------------------------------------------- chat template


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING},
        {"role": "assistant", "content": CONTENT, "reasoning": REASONING},
        {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{CONTENT}"},
        {
            "role": "assistant",
            "content": f"<think>\n{REASONING}\n</think>\n\n{CONTENT}",
            "reasoning_content": REASONING,
        },
        {"role": "assistant", "content": f"{REASONING}\n</think>\n\n{CONTENT}"},  # no opening tag
    ],
    ids=["reasoning_content", "reasoning", "inline", "both", "inline-without-open-tag"],
)
def test_template_renders_reasoning_once(tokenizer, assistant):
    conversation = [{"role": "user", "content": PROBLEM}, assistant]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == RENDERED


def test_template_generation_prompt_and_other_turns(tokenizer, world):
    user = [{"role": "user", "content": PROBLEM}]
    # What vLLM renders for a chat request.
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == PROMPT_PART
    system = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "85"}]
    assert tokenizer.apply_chat_template(system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + PROMPT_PART + "85<|im_end|>\n"
    )
    config = json.loads((world.tokenizer / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenizer.chat_template


def test_generation_prompt_is_a_token_prefix_of_the_training_example(tokenizer):
    conversation = [
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING},
    ]
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(conversation)["input_ids"]
    assert full[: len(prompt)] == prompt
    assert tokenizer.decode(full[len(prompt) :]) == ASSISTANT_PART + "\n"


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    second = "Then 85+1\nones: 5+1=6\ntens: 8+0=8\n85+1=86"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING},
        {"role": "user", "content": "And one more?"},
        {"role": "assistant", "content": f"<think>\n{second}\n</think>\n\nThe answer is \\boxed{{86}}."},
    ]
    out = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, masked in zip(ids, mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == [ASSISTANT_PART, f"<think>\n{second}\n</think>\n\nThe answer is \\boxed{{86}}.<|im_end|>"]


# ---------------------------------------------------------------- models and the build


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_models_load_like_hub_models(world, tokenizer, name):
    path = getattr(world, name)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert config.head_dim >= 32 and config.max_position_embeddings >= 1024
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert AutoTokenizer.from_pretrained(path).chat_template == tokenizer.chat_template

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBLEM}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    manifest = json.loads(world.manifest.read_text())
    assert manifest["models"][name]["params"] == model.num_parameters()


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_a_model_directory_tokenizes_exactly_like_the_tokenizer(world, tokenizer, problems, name):
    """transformers loads a model directory's tokenizer as Qwen2Tokenizer, which rebuilds pre-tokenization in code:
    training, vLLM and the in-process engines must still all see the same ids."""
    from_model = AutoTokenizer.from_pretrained(getattr(world, name))
    for p in problems[:200]:
        text = tokenizer.apply_chat_template(gold_conversation(p), tokenize=False)
        assert from_model(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_teacher_is_larger_than_student(world):
    models = json.loads(world.manifest.read_text())["models"]
    assert models["teacher"]["params"] > 2 * models["student"]["params"]


def test_build_is_deterministic_and_idempotent(world, recipe, tmp_path):
    again = build(tmp_path / "again", **recipe)
    for attr in ("train", "test", "gold", "corpus", "manifest"):
        assert getattr(again, attr).read_bytes() == getattr(world, attr).read_bytes(), attr
    for file in (
        "tokenizer/tokenizer.json",
        "teacher-init/model.safetensors",
        "student-init/model.safetensors",
    ):
        assert (again.root / file).read_bytes() == (world.root / file).read_bytes(), file

    stamps = {p: p.stat().st_mtime_ns for p in again.root.rglob("*")}
    build(again.root, **recipe)  # a rerun writes nothing
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*")} == stamps
    seed = recipe["seed"]
    with pytest.raises(ValueError, match=f"seed={seed} \\(asked {seed + 1}\\)"):
        build(again.root, **{**recipe, "seed": seed + 1})


def test_missing_artifact_is_rebuilt(tmp_path):
    paths = build(tmp_path / "w", seed=0, n_train=20, n_test=10)
    before = paths.student.joinpath("model.safetensors").read_bytes()
    for f in paths.student.iterdir():
        f.unlink()
    paths.student.rmdir()
    build(tmp_path / "w", seed=0, n_train=20, n_test=10)
    assert paths.student.joinpath("model.safetensors").read_bytes() == before


# ---------------------------------------------------------------- TRL accepts the tokenizer and template


def test_sft_trainer_assistant_only_loss_smoke(world, tokenizer, problems, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(world.student)
    before = model.model.embed_tokens.weight.detach().clone()
    dataset = Dataset.from_list([{"messages": gold_conversation(p)} for p in problems[:4]])
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    example = trainer.train_dataset[0]
    trained = tokenizer.decode([t for t in example["labels"] if t != -100])  # TRL folds the mask into labels
    assert trained == tokenizer.apply_chat_template(gold_conversation(problems[0]), tokenize=False).split(
        "<|im_start|>assistant\n"
    )[1].removesuffix("\n")
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.model.embed_tokens.weight.detach())


def test_vllm_deepseek_r1_parser_splits_a_completion(tokenizer):
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser

    parser = DeepSeekR1ReasoningParser(tokenizer)  # raises if <think> or </think> is not in the vocab
    ids = tokenizer.encode(ASSISTANT_PART)
    text = tokenizer.decode(ids, skip_special_tokens=True)  # as vLLM detokenizes
    assert parser.extract_reasoning(text, request=None) == (f"\n{REASONING}\n", f"\n\n{CONTENT}")
    assert parser.is_reasoning_end(ids)
