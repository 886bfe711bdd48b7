"""`bigmodel demo`: the main job end to end, on tiny local models.

Builds (or reuses) a tiny classifier and generator, registers them, starts a real worker
process, submits a mixed bulk job (a couple of deliberately bad requests included), shows
progress, prints a results table and where the results live. It runs embedded with nothing set,
and on Redis, PostgreSQL and S3 when BIGMODEL_* variables point at them.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CLASSIFIER, GENERATOR = "demo-classifier", "demo-generator"
PROMPTS = [
    "Summarise the quarterly report:",
    "Write a product description for a red bicycle:",
    "Traduisez en anglais : le renard brun saute.",
    "请用一句话介绍批量推理：",
    "Once upon a time",
    "Erkläre kurz, was ein Arbeiter tut:",
]


def _ensure_models(client, home: Path, console: Console) -> None:
    try:
        from bigmodel.models.tiny import build_tiny_classifier, build_tiny_generator
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("the demo needs the model stack: pip install 'bigmodel[worker]'") from None
    registered = {m.name: m for m in client.models()}
    cls_dir, gen_dir = home / "demo-models" / "classifier", home / "demo-models" / "generator"
    if not (cls_dir / "model.safetensors").exists():
        console.print(f"building a tiny resnet18 classifier in {cls_dir}")
        build_tiny_classifier(cls_dir, arch="resnet18", num_classes=10)
    if not (gen_dir / "config.json").exists():
        console.print(f"building a tiny GPT-2 generator in {gen_dir}")
        build_tiny_generator(gen_dir)
    if registered.get(CLASSIFIER) is None or registered[CLASSIFIER].source != str(cls_dir):
        client.register_model(CLASSIFIER, str(cls_dir), task="classify", arch="resnet18")
    if registered.get(GENERATOR) is None or registered[GENERATOR].source != str(gen_dir):
        client.register_model(GENERATOR, str(gen_dir), task="generate")


def _requests(client, n_images: int, n_prompts: int) -> list[dict]:
    from bigmodel.models.tiny import make_images
    from bigmodel.storage.s3 import S3Storage

    reqs: list[dict] = []
    for i, jpeg in enumerate(make_images(n_images, size=96, seed=1)):
        if isinstance(client.storage, S3Storage):
            ref = client.storage.put(f"demo/images/{i:04d}.jpg", jpeg, content_type="image/jpeg")
        else:
            ref = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        reqs.append(
            {
                "custom_id": f"img-{i:04d}",
                "model": CLASSIFIER,
                "input": {"image": ref},
                "params": {"top_k": 3},
            }
        )
    for i in range(n_prompts):
        reqs.append(
            {
                "custom_id": f"txt-{i:04d}",
                "model": GENERATOR,
                "input": {"prompt": PROMPTS[i % len(PROMPTS)]},
                "params": {"max_new_tokens": 12, "do_sample": i % 2 == 1, "seed": i},
            }
        )
    # Two deliberately bad requests: they fail alone, with a clear error.
    reqs.append(
        {
            "custom_id": "bad-image",
            "model": CLASSIFIER,
            "input": {
                "image": "data:image/jpeg;base64,"
                + base64.b64encode(b"this is not a jpeg").decode()
            },
        }
    )
    reqs.append(
        {
            "custom_id": "bad-prompt",
            "model": GENERATOR,
            "input": {"prompt": "a very long prompt " * 200},
        }
    )
    return reqs


def run_demo(*, images: int = 36, prompts: int = 36, device: str = "auto") -> int:
    from producer.api import Client
    from producer.cli import wait_with_progress

    console = Console()
    client = Client(check_schema=False)
    from bigmodel.ledger.db import upgrade

    upgrade(client.engine)
    home = client.settings.home.resolve()
    where = (
        "embedded (SQLite, local folder, filesystem broker)"
        if client.settings.embedded
        else "configured services"
    )
    console.print(f"[bold]bigmodel demo[/] — {where}")
    _ensure_models(client, home, console)

    log_path = home / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"starting a worker (log: {log_path})")
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                "--model",
                CLASSIFIER,
                "--model",
                GENERATOR,
                "--device",
                device,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        reqs = _requests(client, images, prompts)
        started = time.monotonic()
        batch = client.submit(reqs, metadata={"source": "demo"})
        console.print(f"submitted {len(reqs)} requests as {batch.id}")

        def check_worker() -> None:
            if worker.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with code {worker.returncode}; see {log_path}"
                )

        try:
            info = wait_with_progress(client, batch.id, check=check_worker)
        except RuntimeError as exc:
            console.print(f"[red]{exc}")
            return 1
        elapsed = time.monotonic() - started
        _show(console, client, info, elapsed)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _show(console: Console, client, info, elapsed: float) -> None:
    table = Table(title=f"{info.id} — {info.status} in {elapsed:.1f}s")
    for col in ("custom_id", "status", "result"):
        table.add_column(col, overflow="fold")
    records = list(client.results(info.id))
    shown = (
        records[:6]
        + [r for r in records if r["custom_id"].startswith("txt-")][:6]
        + [r for r in records if r["status"] != "succeeded"]
    )
    for rec in shown:
        if rec["error"]:
            result = f"[red]{rec['error']['code']}[/]: {rec['error']['message'][:80]}"
        elif "labels" in rec["output"]:
            result = ", ".join(f"{x['label']} {x['score']:.2f}" for x in rec["output"]["labels"])
        else:
            seq = rec["output"]["sequences"][0]
            result = f"{seq['text']!r} ({seq['tokens']} tokens, {seq['finish_reason']})"
        table.add_row(rec["custom_id"], rec["status"], result)
    console.print(table)
    c = info.counts
    console.print(
        f"{c['succeeded']} succeeded, {c['failed']} failed of {c['total']} "
        f"({c['total'] / max(elapsed, 1e-9):.1f} requests/s end to end)"
    )
    console.print(f"database: {client.engine.url.render_as_string(hide_password=True)}")
    if info.output_key:
        console.print(f"output:   {client.storage.uri(info.output_key)}")
        console.print(f"errors:   {client.storage.uri(info.errors_key)}")
    console.print(f"query:    bigmodel results {info.id} --format csv")
