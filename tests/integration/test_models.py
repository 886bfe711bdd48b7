"""The model runners on tiny local models, loaded through the users' code paths."""

import base64
import io
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bigmodel.core.errors import ConfigError
from bigmodel.core.requests import GenerateParams
from bigmodel.core.runner import Item, RunLoop
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task
from bigmodel.ledger.repo import ModelInfo
from bigmodel.models import load_runner
from bigmodel.models.tiny import make_images


def info(name, task, source, arch=None):
    return ModelInfo(name, 1, Task(task), str(source), arch, 8, {}, datetime.now(UTC))


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return Settings(home=tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def generator(tiny_models, settings):
    return load_runner(
        info("gen", "generate", tiny_models["generator"]), device="cpu", settings=settings
    )


@pytest.fixture(scope="module")
def classifier(tiny_models, settings):
    return load_runner(
        info("cls", "classify", tiny_models["classifier"], "resnet18"),
        device="cpu",
        settings=settings,
    )


def gen_item(i, prompt, **params):
    return Item(i, {"prompt": prompt}, GenerateParams(**params).model_dump())


def data_uri(data: bytes, kind="jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "请用一句话介绍批量推理：",
    "Le renard brun saute par-dessus le chien",
    "x",
]


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 12},
        {"max_new_tokens": 12, "do_sample": True, "seed": 1234, "temperature": 0.9, "top_p": 0.9},
        {"max_new_tokens": 8, "do_sample": True, "seed": 5, "top_k": 20, "num_return_sequences": 2},
    ],
)
def test_batched_generation_equals_one_at_a_time(generator, params):
    items = [gen_item(i, p, **params) for i, p in enumerate(PROMPTS)]
    batched = RunLoop(generator, max_batch_size=8).run(items)
    alone = [RunLoop(generator, max_batch_size=1).run([it])[0] for it in items]
    assert all(r.ok for r in batched)
    assert [r.output for r in batched] == [r.output for r in alone]
    for r in batched:
        seqs = r.output["sequences"]
        assert len(seqs) == params.get("num_return_sequences", 1)
        for s in seqs:
            assert isinstance(s["text"], str) and 1 <= s["tokens"] <= params["max_new_tokens"]
            assert s["finish_reason"] in {"length", "eos", "stop"}


def test_same_seed_same_text_whatever_the_batch_mates(generator):
    p = {"max_new_tokens": 10, "do_sample": True, "seed": 42}
    a = RunLoop(generator, max_batch_size=8).run([gen_item(0, "Once upon a time", **p)])
    b = RunLoop(generator, max_batch_size=8).run(
        [
            gen_item(1, "some other much longer prompt here", **p),
            gen_item(0, "Once upon a time", **p),
            gen_item(2, "z", max_new_tokens=3),
        ]
    )
    assert a[0].output == b[1].output
    c = RunLoop(generator, max_batch_size=8).run(
        [gen_item(0, "Once upon a time", **{**p, "seed": 43})]
    )
    assert c[0].output != a[0].output


def test_stop_strings_cut_the_text(generator):
    free = RunLoop(generator, max_batch_size=4).run([gen_item(0, "Hello", max_new_tokens=20)])
    text = free[0].output["sequences"][0]["text"]
    stop = text[3:5]
    res = RunLoop(generator, max_batch_size=4).run(
        [gen_item(0, "Hello", max_new_tokens=20, stop=[stop])]
    )
    seq = res[0].output["sequences"][0]
    assert seq["finish_reason"] == "stop"
    assert seq["text"] == text[: text.find(stop)]
    assert seq["tokens"] < 20


def test_prompt_over_the_context_window_fails_alone(generator):
    res = RunLoop(generator, max_batch_size=4).run(
        [
            gen_item(0, "word " * 400),
            gen_item(1, "fine", max_new_tokens=4),
            gen_item(2, "ok", max_new_tokens=127),
        ]
    )
    assert res[0].error["code"] == "prompt_too_long"
    assert "context window of 128 tokens" in res[0].error["message"]
    assert res[1].ok
    assert res[2].error["code"] == "prompt_too_long"  # 1 prompt token + 127 > 128


def test_unicode_prompts_round_trip_through_the_tokenizer(generator):
    tok = generator.tokenizer
    for p in PROMPTS + ["Ça coûte 5 €, naïve façade", "日本語のテキスト 🙂"]:
        assert tok.decode(tok(p)["input_ids"]) == p


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds almost no data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_classify_top_k_and_bad_images_fail_alone(classifier):
    jpeg, png = make_images(1, size=80)[0], make_images(1, size=50, fmt="PNG")[0]
    from PIL import Image

    gray = io.BytesIO()
    Image.new("L", (40, 30), 128).save(gray, format="PNG")
    items = [
        Item(0, {"image": data_uri(jpeg)}, {"top_k": 3}),
        Item(1, {"image": data_uri(png, "png")}, {"top_k": 10}),
        Item(2, {"image": data_uri(gray.getvalue(), "png")}, {"top_k": 1}),
        Item(3, {"image": data_uri(b"")}, {"top_k": 1}),
        Item(4, {"image": data_uri(b"<html>not an image</html>")}, {"top_k": 1}),
        Item(5, {"image": data_uri(jpeg[: len(jpeg) // 2])}, {"top_k": 1}),
        Item(6, {"image": data_uri(_png_header(30_000, 30_000), "png")}, {"top_k": 1}),
    ]
    res = RunLoop(classifier, max_batch_size=8).run(items)
    assert [r.ok for r in res] == [True, True, True, False, False, False, False]
    labels = res[0].output["labels"]
    assert len(labels) == 3 and len(res[1].output["labels"]) == 10
    assert labels[0]["label"] == f"class_{labels[0]['index']:02d}"
    assert labels == sorted(labels, key=lambda x: -x["score"])
    assert abs(sum(x["score"] for x in res[1].output["labels"]) - 1.0) < 1e-4
    assert [r.error["code"] for r in res[3:]] == [
        "image_decode_failed",
        "image_decode_failed",
        "image_decode_failed",
        "image_too_large",
    ]
    assert "0 bytes" in res[3].error["message"]
    assert "900000000 pixels" in res[6].error["message"]


def test_batched_classification_equals_one_at_a_time(classifier):
    items = [
        Item(i, {"image": data_uri(b)}, {"top_k": 2})
        for i, b in enumerate(make_images(5, size=70, seed=3))
    ]
    batched = RunLoop(classifier, max_batch_size=8).run(items)
    alone = [RunLoop(classifier, max_batch_size=1).run([it])[0] for it in items]
    for a, b in zip(batched, alone, strict=True):
        assert [x["index"] for x in a.output["labels"]] == [x["index"] for x in b.output["labels"]]
        for x, y in zip(a.output["labels"], b.output["labels"], strict=True):
            assert x["score"] == pytest.approx(y["score"], abs=1e-4)


def test_model_source_from_an_s3_prefix(tiny_models, s3_endpoint, s3_bucket, tmp_path):
    from bigmodel.storage import open_storage

    store = open_storage(f"s3://{s3_bucket}/models/gen", endpoint_url=s3_endpoint)
    for f in Path(tiny_models["generator"]).iterdir():
        store.put(f.name, f.read_bytes())
    settings = Settings(home=tmp_path, s3_endpoint_url=s3_endpoint)
    runner = load_runner(
        info("g", "generate", f"s3://{s3_bucket}/models/gen"), device="cpu", settings=settings
    )
    res = RunLoop(runner, max_batch_size=2).run([gen_item(0, "Hello", max_new_tokens=3)])
    assert res[0].ok
    assert (tmp_path / "models" / s3_bucket / "models" / "gen" / "config.json").is_file()


def test_misconfigured_models_say_what_to_fix(tiny_models, settings, tmp_path):
    with pytest.raises(ConfigError, match="does not fit resnet34"):
        load_runner(
            info("c", "classify", tiny_models["classifier"], "resnet34"),
            device="cpu",
            settings=settings,
        )
    with pytest.raises(ConfigError, match="unknown torchvision architecture 'resnet9000'"):
        load_runner(
            info("c", "classify", tiny_models["classifier"], "resnet9000"),
            device="cpu",
            settings=settings,
        )
    with pytest.raises(ConfigError, match="does not exist"):
        load_runner(info("g", "generate", "./no/such/folder"), device="cpu", settings=settings)


def test_reduced_precision_and_channels_last_run_on_cpu_too(tiny_models, settings, classifier):
    from bigmodel.models import Accel

    assert Accel.for_device("cpu") == Accel()  # everything off on CPU by default
    with pytest.raises(ValueError, match="dtype 'float8'"):
        Accel.for_device("cpu", dtype="float8")
    fast = Accel(dtype="bfloat16", channels_last=True)
    cls16 = load_runner(
        info("cls", "classify", tiny_models["classifier"], "resnet18"),
        device="cpu",
        settings=settings,
        accel=fast,
    )
    assert next(cls16.model.parameters()).dtype.__str__() == "torch.bfloat16"
    items = [
        Item(i, {"image": data_uri(b)}, {"top_k": 10})
        for i, b in enumerate(make_images(3, size=64, seed=5))
    ]
    low = RunLoop(cls16, max_batch_size=4).run(items)
    full = RunLoop(classifier, max_batch_size=4).run(items)
    for a, b in zip(low, full, strict=True):
        sa = {x["index"]: x["score"] for x in a.output["labels"]}
        sb = {x["index"]: x["score"] for x in b.output["labels"]}
        assert sa.keys() == sb.keys()
        assert all(abs(sa[k] - sb[k]) < 0.05 for k in sa)
    gen16 = load_runner(
        info("gen", "generate", tiny_models["generator"]),
        device="cpu",
        settings=settings,
        accel=Accel(dtype="bfloat16"),
    )
    res = RunLoop(gen16, max_batch_size=2).run([gen_item(0, "Hello", max_new_tokens=5)])
    assert res[0].ok and res[0].output["sequences"][0]["tokens"] == 5
