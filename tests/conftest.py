import pytest


@pytest.fixture(scope="session")
def toyworld(tmp_path_factory):
    """A small toy world (problems, tokenizer, random teacher/student) built once per test session."""
    from data.toyworld.build import build

    return build(tmp_path_factory.mktemp("toyworld"), seed=0, n_train=300, n_test=30)
