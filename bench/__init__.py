"""The bigmodel benchmark: what the pipeline costs on top of the model, on this machine.

Run it from the repository root with the project's environment:

    .venv/bin/python -m bench                      # everything, about 8 minutes on 2 cores
    .venv/bin/python -m bench --quick              # small workloads, about 2 minutes
    .venv/bin/python -m bench --only classify,null --json-out bench.json

It needs Redis (database 12 by default, which it FLUSHES), a PostgreSQL server it may create a
scratch database on (`bigmodel_bench_<pid>`, dropped at the end) and moto[server], which it runs
as the S3 endpoint on a free loopback port. Everything runs in one process tree: the benchmark,
moto's server, and real `bigmodel worker` processes (`--device cpu` unless `--device` says
otherwise). Every process it starts is stopped (SIGTERM, then SIGKILL) and the scratch database
dropped at the end, on Ctrl-C too. Each section catches its own failure and shows it in its rows.

The machine (cores, RAM, CPU model, torch version and threads, device) is printed first. Then:

classify, generate (sections 1-3): the same inputs measured twice.
  in-process        the model's own limit: the worker's runner (`bigmodel.models.load_runner`)
                    and run loop (`bigmodel.core.runner.RunLoop(...).run(items)`) called directly,
                    after a warm-up batch: fetch + decode + preprocess (images) or tokenize
                    (prompts), batched forward passes / `generate`, encode. No queue, no database,
                    no result storage. Items per second.
  end-to-end        one real worker (`bigmodel worker --max-batch-size B`), started and warmed up
                    with one batch before timing; the same requests submitted with the Python API
                    (`producer.Client.submit`); timed from the submit call until every request is
                    final in the database (polled with `client.status` every 50 ms). The details
                    give the submit time, the time until the batch itself is final (output.jsonl
                    written) and how many outputs equal the in-process ones.
  e2e / in-process  the ratio of the two rates: 1.0 means the queue, ledger and storage cost
                    nothing; the rest is the pipeline's overhead (claim, persist, ack, finalize,
                    the wait window, and batches formed per message rather than over the whole
                    input, so generation has more padding than in-process where all prompts are
                    sorted by length together).
  classify: resnet18 with random weights and 1,000 classes, JPEGs of 224 px from
  `make_images`, referenced as s3:// objects on moto (or data: URIs with `--image-ref data`) in
  both runs, batch 32. generate: GPT-2 small's shape (GPT2Config defaults: 12 layers, 768 dims)
  with random weights and the tiny byte-level tokenizer, prompts of 10-300 characters, 32 new
  tokens, greedy, batch 8.

null (4)  orchestration ceiling: requests per second end to end through one worker running the
          `null:` model (no compute), `--max-batch-size 256`: the most the queue, ledger and
          worker loop can carry, whatever the model.
submit (5)  requests per second of `client.submit(path)` for a JSONL file (null model, no worker
          running): validation, storing input.jsonl, inserting the ledger rows, sending chunk
          messages.
batching (6)  average formed batch: 1,000 one-request submissions sent from 4 threads at once
          to a worker with `--max-batch-size 32 --max-wait-ms 50`, twice: the resnet18 model of
          section 1 (each request one of its s3:// JPEGs), and the null model. A claim stamps
          every request it takes with one `started_at`, so requests grouped by (worker,
          started_at) are one formed batch; average = requests / groups. The details give the
          arrival rate, the items/s from the first submit until all are final, and the worker
          log's "processed N requests from M messages" lines as a cross-check. A busy model
          lets requests gather (a batch is cut when the model is about to free up); with the
          null model nothing is ever busy, so its batches hold what arrives within the wait
          window.
latency (7)  p50 / p95 of submit call → result final (polled every 5 ms) for a single request
          with `priority="high"`, to an idle worker and to one busy with low-priority bulk work
          (the backlog is topped up before every probe; the details give the backlog seen at
          submit and the submit call's own share). Twice: on the null model, whose busy batches
          are short (the queue's and the worker loop's own latency), and on a `null:delay_ms=100`
          model, batch 32, standing in for a model that takes 100 ms per batch: its busy row
          also gives p95 minus the idle p50 against 2 × 100 ms + the default --max-wait-ms.
          Shows "n/a (priority not available)" when `Client.submit` has no `priority` parameter;
          `--latency-without-priority` sends probes and bulk at normal priority, as a baseline.
memory (8)  VmRSS of a null-model worker after 1,000 and after 50,000 processed requests, and the
          growth between the two (a leak shows as growth that keeps rising with the count).

`--quick` shrinks the workloads (64 images, 16 prompts, 5,000 null requests, 5,000 submit lines,
400 one-request submissions, 10 latency probes, memory at 1,000 and 10,000). `--json-out FILE`
writes the same rows with raw numbers (`value`, `unit`, `data`), the machine, the options, and
per section its duration and the share of the CPUs other processes used meanwhile: figures
taken while something else kept the cores busy are flagged under the table.
"""
