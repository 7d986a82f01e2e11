"""Running a benchmark like a production job: batched, resumable, sharded, with progress.

- Predictions are appended as whole JSON lines (`jobs.Journal`: flushed and fsynced after every
  batch) to OUT/predictions.jsonl (rank 0) or OUT/predictions.rank<R>.jsonl: a SIGKILL loses at
  most the batch in flight, and a rerun skips every item already answered (a partial last line
  from a killed write is cut off before appending).
- Under torchrun each process answers items[rank::world]; after a barrier rank 0 reads every
  journal and scores, so one process and N processes give the same report.
- Decoding goes through `CogVLM.generate` (batched, greedy unless sampling flags say otherwise).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from ..errors import ContextLengthError, ImageError, UsageError
from ..files import write_text
from ..image import load_image
from ..jobs import Journal, read_journal, torchrun_group
from ..progress import Progress
from .formats import Benchmark, Item, check_images, rows_of
from .formats.vlmevalkit import read_tsv
from .predictions import PredictionCheck, read_predictions_file
from .prompts import Prompt, prompt_for
from .report import build_report, write_report
from .scorers import Scorer, scorer_for
from .tasks import TASKS, Task

if TYPE_CHECKING:
    from ..api import CogVLM


def journal_path(out: Path, rank: int) -> Path:
    return out / ("predictions.jsonl" if rank == 0 else f"predictions.rank{rank}.jsonl")


PREDICTION = "prediction record"


def read_predictions(out: Path) -> dict[str, str]:
    """Every prediction recorded under OUT, by any rank, in this run or an interrupted one."""
    preds: dict[str, str] = {}
    for path in sorted(out.glob("predictions*.jsonl")):
        for row in read_journal(path, PREDICTION)[0]:
            preds[row["id"]] = row["prediction"]
    return preds


def build_query(prompt: Prompt, item: Item) -> str:
    try:
        return prompt.query.format(**item.fields)
    except KeyError as e:
        raise UsageError(f"--prompt uses {{{e.args[0]}}}, which this task does not have; it has "
                         f"{', '.join('{' + k + '}' for k in item.fields) or 'no fields'}") from None


def _load(item: Item) -> Image.Image | None:
    """The item's image, or None (said on stderr) when it cannot be read: one bad file among
    thousands must not stop the job; its answer is recorded empty and scores as wrong."""
    try:
        return load_image(item.image)
    except (ImageError, OSError) as e:
        print(f"cogvlm eval: item {item.id}: unreadable image, answer left empty ({e})", file=sys.stderr)
        return None


def answer_items(vlm: CogVLM, items: Sequence[Item], journal: Journal, prompt: Prompt, batch_size: int,
                 sampling: dict[str, Any], progress: Progress) -> int:
    """Generate answers for `items`, `batch_size` at a time, recording each batch as it ends."""
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images = [_load(it) for it in batch]
        readable = [(it, img) for it, img in zip(batch, images) if img is not None]
        answers = vlm.generate([(img, build_query(prompt, it), None) for it, img in readable],
                               template=prompt.template, **sampling)
        found = {it.id: a for (it, _), a in zip(readable, answers)}
        journal.write({"id": it.id, "prediction": found.get(it.id, "")} for it in batch)
        progress.update(len(batch))
    return len(items)


def barrier(size: int) -> None:
    if size > 1:
        import torch.distributed as dist

        dist.barrier()


def answer_journalled(out: Path, rank: int, size: int, todo: int, label: str, unit: str,
                      answer: Callable[[Journal, Progress], None], progress: bool = True,
                      progress_every: float = 30.0) -> None:
    """`answer(journal, bar)` with this rank's prediction journal (`journal_path`) and progress bar,
    both closed however it ends; a prompt too long for the model is the user's UsageError. Every
    rank then waits for the others (`barrier`), so rank 0 scores all predictions."""
    journal = Journal(journal_path(out, rank), PREDICTION)
    bar = Progress(todo, label + (f" rank {rank}" if size > 1 else ""), unit, enabled=progress and bool(todo),
                   every=progress_every)
    try:
        answer(journal, bar)
    except ContextLengthError as e:
        raise UsageError(str(e)) from None
    finally:
        journal.close()
        bar.close()
    barrier(size)


def check_run(out: Path, settings: dict[str, Any], rank: int = 0) -> None:
    """OUT/run.json remembers what the predictions answer; resuming with other settings would mix
    two runs' answers in one score."""
    path = out / "run.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise UsageError(f"{out} holds predictions of another run ({', '.join(changed)} differ: "
                             f"{before.get(changed[0])!r} vs {settings[changed[0]]!r}); use another --out")
        return
    if rank == 0:  # the other ranks check it on their next start
        write_text(path, json.dumps(settings, indent=2) + "\n")


def read_benchmark(task: Task, annotations: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """The task's own files, or VLMEvalKit's TSV of it (recognized by the .tsv suffix)."""
    for path in annotations:
        if not Path(path).is_file():
            raise FileNotFoundError(f"annotations file not found: {path}")
    if any(Path(p).suffix.lower() == ".tsv" for p in annotations):
        if task.tsv_kind is None:
            raise UsageError(f"VLMEvalKit does not ship {task.title}; give the publisher's files instead")
        return read_tsv([Path(p) for p in annotations], task.tsv_kind, split)
    # a reader indexes the publisher's records directly: a crafted or damaged file's KeyError or
    # TypeError is named here, with the files (RefCOCO and the TSV reader name the row too)
    with rows_of(Path(", ".join(map(str, annotations))), "a record"):
        return task.reader([Path(p) for p in annotations], images, split)


@dataclass
class Job:
    """A benchmark read and checked, ready to answer: what `prepare` returns."""

    task: Task
    split: str
    items: list[Item]
    prompt: Prompt
    scorer: Scorer
    notes: list[str]  # what reading the files found that the report must say


def prepare(task_name: str, annotations: Sequence[Path], images: Path | None = None, split: str | None = None,
            limit: int | None = None, model: str = "", query: str | None = None,
            template: str | None = None, scorer: str | None = None, answering: bool = True) -> Job:
    """Read the files, pick the prompt and the scorer and check them (images exist, the prompt's
    fields are the task's, the scorer is one of the task's): every user mistake is found here,
    before the model loads. `answering=False` (existing answers are scored) skips the images."""
    task = TASKS[task_name]
    chosen = scorer_for(task.name, task.scorers, scorer)
    bench = read_benchmark(task, annotations, images, split)
    items = bench.items[:limit]
    if not items:
        raise UsageError(f"no {task.title} items in split {bench.split!r}; is --split right?")
    prompt = prompt_for(task.prompt, model, query, template)
    if answering:
        check_images(items)
        build_query(prompt, items[0])  # every item of a task has the same fields
    return Job(task, bench.split, items, prompt, chosen, bench.notes)


def score_job(job: Job, preds: dict[str, str], settings: dict[str, Any], model: str = "",
              check: PredictionCheck | None = None, predictions_file: Path | None = None) -> dict[str, Any]:
    """The report of `preds` on the job's items with the job's scorer. Items without an answer are
    counted (in `check`) and scored as an empty answer."""
    check = check or PredictionCheck(missing=[it.key for it in job.items if it.id not in preds])
    complete = {it.id: preds.get(it.id, "") for it in job.items}
    notes = list(job.notes)
    metrics = job.scorer.score(job.items, complete, notes)
    return build_report(job.task, job.split, model, metrics, len(job.items), settings, scorer=job.scorer,
                        notes=notes + check.lines(), check=check.summary(),
                        predictions_file=None if predictions_file is None else str(predictions_file))


def score_file(job: Job, predictions_file: Path, out: Path | None = None) -> dict[str, Any]:
    """Score answers that already exist (any model's), without a model or images; writes
    report.json/.md to `out` when given."""
    preds, check = read_predictions_file(predictions_file, job.items)
    report = score_job(job, preds, {"task": job.task.name, "split": job.split, "scorer": job.scorer.name},
                       f"answers from {Path(predictions_file).name}", check, predictions_file)
    if out is not None:
        make_out(Path(out))
        write_report(report, Path(out))
    return report


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror or e}") from None


def run_job(vlm: CogVLM, job: Job, out: Path | None = None, batch_size: int = 16,
            sampling: dict[str, Any] | None = None, model: str = "", progress_every: float = 30.0,
            progress: bool = True, data_parallel: bool = True) -> dict[str, Any]:
    """Answer (or resume answering) a prepared benchmark and score it; returns the report (or, for
    hidden answers, where the submission file is). Under torchrun call it on every rank: each
    answers its share, rank 0 scores. `data_parallel=False` for a tensor-parallel model, whose
    ranks all serve rank 0's calls instead."""
    task, items, prompt = job.task, job.items, job.prompt
    out = Path(out or Path("eval-results") / f"{task.name}-{job.split}")
    make_out(out)
    rank, size = torchrun_group() if data_parallel else (0, 1)
    settings = {"task": task.name, "split": job.split, "model": str(model), "template": prompt.template,
                "prompt": prompt.query, "sampling": {"top_k": 1, "max_new_tokens": task.max_new_tokens, **(sampling or {})}}
    check_run(out, settings, rank)
    done = read_predictions(out)
    mine = [it for it in items[rank::size] if it.id not in done]
    answer_journalled(out, rank, size, len(mine), f"eval {task.name} {job.split}", "item",
                      lambda journal, bar: answer_items(vlm, mine, journal, prompt, batch_size, settings["sampling"],
                                                        bar),
                      progress, progress_every)
    if rank != 0:
        return {"task": task.name, "split": job.split, "rank": rank}
    preds = read_predictions(out)
    if any(it.answers is None for it in items):
        if task.submission is None:
            raise UsageError(f"{task.title} {job.split} has no answers to score against")
        path = out / "submission.json"
        write_text(path, json.dumps(task.submission(items, preds), ensure_ascii=False) + "\n")
        return {"task": task.name, "split": job.split, "n": len(items), "submission": str(path)}
    report = score_job(job, preds, {**settings, "prompt_source": prompt.source, "batch_size": batch_size,
                                    "scorer": job.scorer.name}, model)
    write_report(report, out)
    return report


def run_task(vlm: CogVLM, task_name: str, annotations: Sequence[Path], images: Path | None = None,
             split: str | None = None, limit: int | None = None, out: Path | None = None,
             query: str | None = None, template: str | None = None, batch_size: int = 16,
             sampling: dict[str, Any] | None = None, model: str = "", progress_every: float = 30.0,
             progress: bool = True, scorer: str | None = None) -> dict[str, Any]:
    """`prepare` then `run_job`: one call from the Python API."""
    job = prepare(task_name, annotations, images, split, limit, model, query, template, scorer)
    return run_job(vlm, job, out, batch_size, sampling, model, progress_every, progress)
