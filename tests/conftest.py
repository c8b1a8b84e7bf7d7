import pytest

# The modules whose fixture runs for minutes, longest first. `make test` (--dist loadfile --no-loadscope-reorder)
# hands whole files to its two workers in collection order: these start at once, one per worker, and the short
# files fill in beside them (xdist's default order, most tests first, started them last: the run's long tail).
# Measured with --durations (RESULTS.md, "Test suite"): the CI quickstart ~290 s, the code grader's canonical
# HumanEval+/MBPP+ runs ~170 s, then the files that start vLLM servers (~50-65 s each); the files after these take
# seconds each, so the run ends in a short tail.
LONG_POLES = ("tests/test_quickstart.py", "tests/evals/test_code_grader.py", "tests/tracegen/test_vllm_server.py",
              "tests/sft/test_on_policy_server.py", "tests/sft/test_qat_arms.py", "tests/evals/test_shared_server.py",
              "tests/tracegen/test_inprocess_engines.py", "tests/sft/test_prune.py", "tests/evals/test_efficiency.py")


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONG_POLES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_POLES)))  # stable: the rest keep theirs


@pytest.fixture(scope="session")
def toyworld(tmp_path_factory):
    """A small toy world (problems, tokenizer, random teacher/student) built once per test session."""
    from data.toyworld.build import build

    return build(tmp_path_factory.mktemp("toyworld"), seed=0, n_train=300, n_test=30)
