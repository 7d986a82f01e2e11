"""`cogvlm eval`: a published benchmark (--task), a JSONL set in the training format, or two
reports side by side (--compare)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..caption import DECODERS
from ..errors import UsageError
from ..eval.tasks import TASKS
from ..jobs import leave_group, share_items
from .flags import add_model_flags, load_model, load_options, sampling_flags


def cmd_eval(args: argparse.Namespace) -> int:
    if args.compare:
        from ..eval.report import compare, load_report

        a, b = args.compare
        print(compare(load_report(a), load_report(b), (str(a), str(b))))
        return 0
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.task is None:
        return _eval_jsonl(args)
    if args.data is not None:
        raise UsageError("give either a JSONL file or --task, not both")
    if not args.annotations:
        raise UsageError(f"--task {args.task} needs --annotations FILE(S) (docs/eval.md says which)")
    if args.predictions is not None:
        return _score_predictions(args)
    from ..eval.report import table
    from ..eval.runner import prepare, run_job

    sampling, options = sampling_flags(args), load_options(args)
    job = prepare(args.task, args.annotations, args.images, args.split, args.limit, args.model, args.prompt,
                  args.template, args.scorer)  # every file, prompt or scorer mistake before the (slow) model load
    # under torchrun each process answers its share of the items with a model of its own, unless
    # --tp N splits one model over the processes (then rank 0 answers every item)
    rank, size, options = share_items(options)
    vlm = load_model(options, sampling)
    result = run_job(vlm, job, args.out, args.batch_size, sampling, args.model, args.progress_every,
                     data_parallel=options.world == 1)
    if rank == 0:
        if "submission" in result:
            print(f"{TASKS[args.task].title} {result['split']}: answers are hidden; wrote the submission file "
                  f"{result['submission']} ({result['n']} items) for the official server")
        else:
            print(table(result))
    if size > 1:
        leave_group()
    return 0


def _score_predictions(args: argparse.Namespace) -> int:
    """--predictions: score existing answers; no model is loaded and no image is decoded."""
    from ..eval.report import table
    from ..eval.runner import prepare, score_file

    if args.prompt:
        raise UsageError("--prompt cannot apply to --predictions (the answers exist already)")
    # --images only for Visual7W, whose boxes are scaled by each image's size (read from its header)
    job = prepare(args.task, args.annotations, args.images, args.split, args.limit, scorer=args.scorer,
                  answering=False)
    print(table(score_file(job, args.predictions, args.out)))
    return 0


def _eval_jsonl(args: argparse.Namespace) -> int:
    from ..data.records import is_video_set
    from ..eval.jsonl import evaluate, format_table, write_json

    if args.data is None:
        raise UsageError("give a JSONL file, or --task NAME --annotations FILE(S) (see cogvlm eval --help)")
    if not Path(args.data).is_file():
        raise UsageError(f"data file not found: {args.data}")
    if is_video_set(args.data):
        return _eval_videos(args)
    task_only = [f"--{k}" for k in ("annotations", "images", "split", "out", "prompt", "scorer", "predictions")
                 if getattr(args, k)]
    if task_only:
        raise UsageError(f"{', '.join(task_only)} need --task NAME (a JSONL file needs none of them)")
    vlm = load_model(load_options(args), sampling_flags(args))
    result = evaluate(vlm, args.data, batch_size=args.batch_size, limit=args.limit)
    print(format_table(result))
    if args.output:
        write_json(result, args.output)
        print(f"wrote {args.output}")
    return 0


def _eval_videos(args: argparse.Namespace) -> int:
    """A video set ({"id", "video", "question", "answer(s)"} lines): batched, resumable in --out,
    data parallel under torchrun, as a benchmark is."""
    from ..eval.video_jsonl import evaluate_videos, format_report

    task_only = [f"--{k}" for k in ("annotations", "images", "split", "prompt", "scorer", "predictions", "output")
                 if getattr(args, k)]
    if task_only:
        raise UsageError(f"{', '.join(task_only)} do not apply to a video set (its report is --out DIR/report.json)")
    if args.decoders < 1:
        raise UsageError(f"--decoders must be >= 1, not {args.decoders}")
    sampling = sampling_flags(args)
    rank, size, options = share_items(load_options(args))
    vlm = load_model(options, sampling)
    report = evaluate_videos(vlm, args.data, args.out, args.template, args.batch_size, sampling, args.limit,
                             args.decoders, args.model, progress_every=args.progress_every,
                             data_parallel=options.world == 1)
    if rank == 0:
        print(format_report(report))
    if size > 1:
        leave_group()
    return 0


def add_eval_verb(verbs: Any) -> None:
    """Register `cogvlm eval` on the top-level parser's subcommands."""
    p = verbs.add_parser("eval", help="score a model on a published benchmark (--task) or a JSONL set",
                         description="With --task: answer a published benchmark read from its publisher's files "
                                     "(or VLMEvalKit's TSV), batched and resumable, score it with the official "
                                     "metric and print the score beside the published number (hidden test answers: "
                                     "writes the server's submission file). With a JSONL file: today's evaluation "
                                     "of the training format. See docs/eval.md.")
    p.add_argument("data", nargs="?", help="JSONL file in the training format (docs/data-format.md)")
    p.add_argument("--task", choices=sorted(TASKS), help="benchmark to run")
    p.add_argument("--annotations", nargs="+", type=Path, metavar="FILE",
                   help="the benchmark's files as published (docs/eval.md lists them per task), or a VLMEvalKit .tsv")
    p.add_argument("--images", type=Path, metavar="DIR", help="folder of the benchmark's images")
    p.add_argument("--split", help="split inside the files (Karpathy: test; RefCOCO: val/testA/testB/test; ...)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items (JSONL: records)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="predictions, report.json/.md or submission.json (default eval-results/TASK-SPLIT); "
                        "a rerun with the same DIR resumes")
    p.add_argument("--prompt", help="query instead of the documented one, with the task's {fields}, "
                                    "e.g. '{question} Answer in one word.'")
    p.add_argument("--scorer", metavar="NAME",
                   help="scoring code to follow instead of the task's default (its publisher's or server's); "
                        "docs/eval.md lists each task's scorers, e.g. vqa-2016, vqa-2021, evalai-vqa, lenient")
    p.add_argument("--predictions", type=Path, metavar="ANSWERS.jsonl",
                   help="score these existing answers ({\"question_id\", \"answer\"} per line; captions "
                        "{\"image_id\", \"caption\"}) instead of generating: no model, no images")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="answers generated together (default 16)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                   help="seconds between progress lines when stderr is not a terminal (default 30)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print two report.json files side by side and exit")
    p.add_argument("--output", help="JSONL mode: write metrics and predictions to this JSON file")
    p.add_argument("--decoders", type=int, default=DECODERS, metavar="N",
                   help=f"video sets: threads decoding the next batches' clips while the model works (default {DECODERS})")
    add_model_flags(p)
    p.set_defaults(func=cmd_eval)
