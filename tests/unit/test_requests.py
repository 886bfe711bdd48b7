import json

import pytest

from bigmodel.core.errors import SubmissionRejected
from bigmodel.core.requests import ModelRef, parse_jsonl, parse_records, parse_submission
from bigmodel.core.status import Task

MODELS = {"cls": ModelRef("cls", Task.CLASSIFY), "gen": ModelRef("gen", Task.GENERATE)}
IMG = "data:image/png;base64,iVBORw0KGgo="


def line(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False)


def rejected(lines) -> SubmissionRejected:
    with pytest.raises(SubmissionRejected) as info:
        parse_jsonl(lines, MODELS)
    return info.value


def test_valid_lines_get_defaults_and_keep_order():
    specs = parse_jsonl(
        [
            line(custom_id="a", model="cls", input={"image": "s3://b/k.jpg"}),
            line(
                custom_id="b",
                model="gen",
                input={"prompt": "héllo 你好"},
                params={"max_new_tokens": 4, "do_sample": True, "seed": 7, "temperature": 1},
            ),
        ],
        MODELS,
    )
    assert [s.custom_id for s in specs] == ["a", "b"]
    assert specs[0].params == {"top_k": 5}
    assert specs[1].input == {"prompt": "héllo 你好"}
    assert specs[1].params["max_new_tokens"] == 4
    assert specs[1].params["temperature"] == 1.0
    assert specs[1].params["stop"] == []
    assert specs[1].line == 2


def test_bom_crlf_and_blank_lines_are_accepted():
    data = (
        "\ufeff"
        + line(custom_id="a", model="gen", input={"prompt": "x"})
        + "\r\n\r\n"
        + line(custom_id="b", model="gen", input={"prompt": "y"})
        + "\r\n"
    ).encode()
    specs = parse_jsonl(data.splitlines(), MODELS)
    assert [(s.custom_id, s.line) for s in specs] == [("a", 1), ("b", 3)]


def test_every_bad_line_is_reported_with_its_number_and_reason():
    err = rejected(
        [
            line(custom_id="ok", model="gen", input={"prompt": "fine"}),
            "{not json",
            line(model="gen", input={"prompt": "no id"}),
            line(custom_id="u", model="nope", input={"prompt": "x"}),
            line(custom_id="ok", model="gen", input={"prompt": "dup"}),
            line(custom_id="w", model="cls", input={"prompt": "generate input to classify"}),
            line(custom_id="p", model="gen", input={"prompt": "x"}, params={"max_new_tokens": -1}),
            line(
                custom_id="t",
                model="gen",
                input={"prompt": "x"},
                params={"temperature": -0.5, "top_k": 0},
            ),
            line(custom_id="e", model="gen", input={"prompt": "x"}, params={"beams": 3}),
            "[1, 2]",
        ]
    )
    by_line = {}
    for e in err.errors:
        by_line.setdefault(e.line, []).append(e)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "invalid JSON" in by_line[2][0].reason
    assert by_line[3][0].field == "custom_id" and "missing" in by_line[3][0].reason
    assert "unknown model 'nope'" in by_line[4][0].reason and "cls, gen" in by_line[4][0].reason
    assert "duplicate custom_id, first used on line 1" in by_line[5][0].reason
    assert {e.field for e in by_line[6]} == {"input.image", "input.prompt"}
    assert "classify model" in by_line[6][0].reason
    assert by_line[7][0].field == "params.max_new_tokens"
    assert {e.field for e in by_line[8]} == {"params.temperature", "params.top_k"}
    assert by_line[9][0].field == "params.beams" and by_line[9][0].reason == "unknown field"
    assert "expected a JSON object" in by_line[10][0].reason
    assert "9 of 10 lines are invalid" in str(err)
    assert "line 5 (custom_id 'ok'), field 'custom_id'" in str(err)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"top_k": 0}, "greater than or equal to 1"),
        ({"top_k": 10**9}, "less than or equal to 1000"),
        ({"top_k": "5"}, "valid integer"),
    ],
)
def test_classify_params_out_of_range(params, fragment):
    err = rejected([line(custom_id="a", model="cls", input={"image": IMG}, params=params)])
    assert fragment in err.errors[0].reason


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"max_new_tokens": 0}, "greater than or equal to 1"),
        ({"max_new_tokens": 10**6}, "less than or equal to"),
        ({"temperature": -1.0}, "greater than or equal to 0"),
        ({"top_p": 0}, "greater than 0"),
        ({"top_k": 10**9}, "less than or equal to"),
        ({"num_return_sequences": 3}, "needs do_sample=true"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"stop": "END"}, "valid list"),
        ({"stop": [""]}, "1 to 256 characters"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"do_sample": "yes"}, "valid boolean"),
    ],
)
def test_generate_params_out_of_range(params, fragment):
    err = rejected([line(custom_id="a", model="gen", input={"prompt": "x"}, params=params)])
    assert fragment in err.errors[0].reason, err.errors[0].reason


@pytest.mark.parametrize(
    "image, fragment",
    [
        ("ftp://x/y.jpg", "s3://bucket/key"),
        ("data:image/png,rawbytes", "base64"),
        ("", "at least 6"),
    ],
)
def test_bad_image_references(image, fragment):
    err = rejected([line(custom_id="a", model="cls", input={"image": image})])
    assert fragment in err.errors[0].reason


def test_empty_file_is_rejected():
    assert "holds no requests" in rejected([]).errors[0].reason
    assert "holds no requests" in rejected([b"", b"  "]).errors[0].reason


def test_not_utf8_and_oversized_lines():
    with pytest.raises(SubmissionRejected) as info:
        parse_jsonl([b"\xff\xfe{}", b"x" * 100], MODELS, max_line_bytes=50)
    reasons = [e.reason for e in info.value.errors]
    assert "not valid UTF-8" in reasons[0]
    assert "over the limit of 50" in reasons[1]


def test_too_many_requests():
    lines = [line(custom_id=str(i), model="gen", input={"prompt": "x"}) for i in range(5)]
    with pytest.raises(SubmissionRejected) as info:
        parse_jsonl(lines, MODELS, max_requests=3)
    assert "more than 3 requests" in info.value.errors[-1].reason


def test_records_parse_like_lines_and_unknown_format_is_named():
    specs = parse_records([{"custom_id": "a", "model": "gen", "input": {"prompt": "é"}}], MODELS)
    assert specs[0].input["prompt"] == "é"
    with pytest.raises(ValueError, match="unknown input format 'openai'"):
        parse_submission([], MODELS, format="openai")


def test_nul_characters_are_rejected_with_their_line():
    err = rejected(
        [
            line(custom_id="a", model="gen", input={"prompt": "bad\u0000prompt"}),
            line(custom_id="b", model="gen", input={"prompt": "a \\u0000 shown"}),
        ]
    )
    assert [(e.line, "NUL character" in e.reason) for e in err.errors] == [(1, True)]
