"""`cogvlm eval CLIPS.jsonl` for a video model: one question about one clip per line
(`{"id", "video", "question", "answer"}` or `"answers"`, docs/eval.md "Video sets").

Run like a benchmark (runner.py): answers are appended to OUT/predictions.jsonl after every batch
(a rerun skips the ids there), run.json refuses a resume with other settings, torchrun ranks
answer every N-th record and rank 0 scores. The clips of the next batches are decoded by the
caption job's decoder threads (`caption.decoded_batches`) while the model answers the current one,
each sampled by the rule of the template it is asked in (docs/spec/cogvlm2-video.md section 8).
A clip that cannot be decoded is recorded as an error row (`{"id", "error"}`), not scored, and
the rest are scored: VQA accuracy against several annotators' answers, normalized exact match
against one (`jsonl.vqa_accuracy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..caption import DECODERS, Media, decoded_batches, load_media
from ..data.records import VideoRecord, read_video_records
from ..errors import UsageError
from ..files import write_text
from ..jobs import Journal, read_journal, torchrun_group
from ..progress import Progress
from ..prompt import check_takes_video
from .jsonl import vqa_accuracy
from .runner import PREDICTION, answer_journalled, check_run, make_out

if TYPE_CHECKING:
    from ..api import CogVLM


def read_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Every answer or error row recorded under OUT, by any rank, in this run or an interrupted one."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("predictions*.jsonl")):
        for row in read_journal(path, PREDICTION)[0]:
            rows[row["id"]] = row
    return rows


def answer_records(vlm: CogVLM, records: Sequence[VideoRecord], journal: Journal, template: str,
                   sampling: dict[str, Any], batch_size: int, decoders: int, progress: Progress) -> None:
    """Answer `records` `batch_size` at a time, their clips decoded ahead by `decoders` threads;
    each batch's rows are journalled as it ends."""
    media = Media(video=True).for_model(template, vlm.config)
    with decoded_batches(records, batch_size, lambda r: load_media(r.video, r.video, media), decoders) as batches:
        for batch, clips in batches:
            good = [(r, c) for r, c in zip(batch, clips) if not isinstance(c, str)]
            answers = vlm.generate([(None, r.question, None, c) for r, c in good], template, **sampling)
            found = {r.id: a for (r, _), a in zip(good, answers)}
            journal.write({"id": r.id, "prediction": found[r.id]} if r.id in found else {"id": r.id, "error": c}
                          for r, c in zip(batch, clips))
            progress.update(len(batch))


def score_rows(records: Sequence[VideoRecord], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean accuracy over the records answered; error rows and unanswered records are listed."""
    examples, errors, scores = [], [], []
    for r in records:
        row = rows.get(r.id, {"id": r.id, "error": "not answered"})
        if "error" in row:
            errors.append({"id": r.id, "line": r.line, "video": str(r.video), "error": row["error"]})
            continue
        value = vqa_accuracy(row["prediction"], r.answers)
        scores.append(value)
        examples.append({"id": r.id, "line": r.line, "question": r.question, "answers": r.answers,
                         "prediction": row["prediction"], "accuracy": value})
    metrics = {"accuracy": sum(scores) / len(scores)} if scores else {}
    return {"metrics": metrics, "counts": {"accuracy": len(scores)} if scores else {}, "errors": errors,
            "examples": examples}


def evaluate_videos(vlm: CogVLM, path: str | Path, out: str | Path | None = None, template: str | None = None,
                    batch_size: int = 8, sampling: dict[str, Any] | None = None, limit: int | None = None,
                    decoders: int = DECODERS, model: str = "", progress: bool = True,
                    progress_every: float = 30.0, data_parallel: bool = True) -> dict[str, Any]:
    """Answer (or resume answering) a video set and score it; writes OUT/report.json and returns
    it (on ranks other than 0: which rank it was). Greedy unless `sampling` says otherwise.
    `data_parallel=False` for a tensor-parallel model, whose ranks all serve rank 0's calls."""
    check_takes_video(vlm.config)
    path = Path(path)
    records, bad = read_video_records(path)
    records = records[:limit]
    if not records:
        raise UsageError(f"{path} holds no usable video records" + (f" (line {bad[0].line}: {bad[0].message})" if bad else ""))
    template = template or vlm.config.template
    out = Path(out or Path("eval-results") / path.stem)
    make_out(out)
    rank, size = torchrun_group() if data_parallel else (0, 1)
    settings = {"data": str(path), "model": str(model), "template": template,
                "sampling": {"top_k": 1, **(sampling or {})}}
    check_run(out, settings, rank)
    done = read_rows(out)
    mine = [r for r in records[rank::size] if r.id not in done]
    answer_journalled(out, rank, size, len(mine), f"eval {path.name}", "clip",
                      lambda journal, bar: answer_records(vlm, mine, journal, template, settings["sampling"],
                                                          batch_size, decoders, bar),
                      progress, progress_every)
    if rank != 0:
        return {"data": str(path), "rank": rank}
    report = {**score_rows(records, read_rows(out)), "skipped_records": [{"line": e.line, "error": e.message} for e in bad],
              "settings": {**settings, "batch_size": batch_size}}
    write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The score table, then one line per clip that could not be answered and per skipped line."""
    from .jsonl import format_table

    lines = [format_table(report)]
    lines += [f"error: {e['id']} ({e['video']}): {e['error']}" for e in report["errors"]]
    lines += [f"skipped: line {e['line']}: {e['error']}" for e in report["skipped_records"]]
    return "\n".join(lines)
