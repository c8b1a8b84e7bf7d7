import pytest

from tracegen.records import request_key, split_reasoning, trace_id


@pytest.mark.parametrize("message, expected", [
    ({"content": "42", "reasoning": "think"}, ("think", "42", "field")),
    ({"content": "42", "reasoning_content": "think"}, ("think", "42", "field")),
    ({"content": "42", "reasoning": "", "reasoning_content": "rc"}, ("rc", "42", "field")),
    ({"content": "<think>\nstep 1\n</think>\n\nThe answer is 42"}, ("step 1", "The answer is 42", "think_tags")),
    ({"content": "step 1\n</think>\n\n42"}, ("step 1", "42", "think_tags")),  # template opened <think>
    ({"content": "<think>\nstep 1, step 2"}, ("step 1, step 2", "", "think_tags")),  # truncated
    ({"content": "just 42"}, (None, "just 42", "none")),
    ({"content": None}, (None, None, "none")),
])
def test_split_reasoning(message, expected):
    assert split_reasoning(message) == expected


def test_keys_depend_on_everything_that_decides_the_output():
    base = dict(messages=[{"role": "user", "content": "q"}], model="m", endpoint="local",
                sampling={"temperature": 0.6, "top_p": 0.95})
    key = request_key(**base)
    assert key == request_key(**base)
    assert key != request_key(**{**base, "model": "m2"})
    assert key != request_key(**{**base, "endpoint": "api.deepseek.com"})
    assert key != request_key(**{**base, "sampling": {"temperature": 0.7, "top_p": 0.95}})
    assert key != request_key(**{**base, "messages": [{"role": "user", "content": "q "}]})
    ids = {trace_id(key, p, i) for p in ("a", "b") for i in range(100)}
    assert len(ids) == 200 and trace_id(key, "a", 0) == trace_id(key, "a", 0)
