import pytest

from bayling.params import GenerationParams


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature must be a number >= 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": "10"}, "max_new_tokens must be an integer >= 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ({"stop": [1]}, "stop must be a list of str"),
])
def test_invalid_params_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_from_request_normalises_fastchat_fields():
    p = GenerationParams.from_request({"temperature": 0, "top_p": 1, "top_k": -1, "stop": "###",
                                       "max_new_tokens": 5, "model": "x", "prompt": "hi", "echo": None})
    assert p.greedy and p.top_k == 0 and p.stop == ("###",) and p.max_new_tokens == 5 and not p.echo
    assert hash(p) == hash(GenerationParams.from_request({"temperature": 0, "stop": ["###"], "max_new_tokens": 5}))
