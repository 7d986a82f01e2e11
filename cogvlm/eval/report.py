"""The report: each metric beside the number published for that model and split, and the gap;
as a terminal table, JSON and Markdown. `compare` puts two reports side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_text
from ..errors import UsageError
from .scorers import Scorer
from .tasks import Published, Task


def published_for(task: Task, split: str, model: str) -> dict[str, Published]:
    """Per metric, the published number for this split: the evaluated model's own if there is one,
    else the first listed (the paper's CogVLM-17B). A file that mixes splits and reports each as a
    row "metric/split" (VLMEvalKit's POPE: "accuracy/adversarial") gets that split's number there."""
    found: dict[str, Published] = {}
    for p in task.published:
        key = p.metric if p.split == split else f"{p.metric}/{p.split}"
        if key not in found or Path(str(model)).name == p.model:
            found[key] = p
    return found


def build_report(task: Task, split: str, model: str, metrics: dict[str, float], n: int,
                 settings: dict[str, Any], scorer: Scorer, notes: list[str] | None = None,
                 check: dict[str, Any] | None = None, predictions_file: str | None = None) -> dict[str, Any]:
    """Scores in percent (CIDEr and BLEU x 100), as the papers print them, with the scorer that
    gave them, the predictions file (when the answers were not generated here), what did not match
    the benchmark, and a published number only with whether a second source confirms it."""
    published = published_for(task, split, model)
    rows = []
    for name, value in metrics.items():
        score = round(100 * value, 2)
        pub = published.get(name)
        rows.append({"metric": name, "score": score, "published": pub.value if pub else None,
                     "gap": round(score - pub.value, 2) if pub else None,
                     "published_model": pub.model if pub else None, "source": pub.source if pub else None,
                     "verified_by": pub.second_source if pub else None})
    return {"task": task.name, "title": task.title, "split": split, "model": str(model), "n": n,
            "scorer": {"name": scorer.name, "official": scorer.official, "source": scorer.source},
            "predictions_file": predictions_file, "notes": notes or [], "check": check or {},
            "rows": rows, "settings": settings}


def _scorer_line(sc: dict[str, Any]) -> str:
    label = "" if sc["official"] else " (NOT the official scorer)"
    return f"scorer: {sc['name']}{label}: {sc['source']}"


def _source_line(r: dict[str, Any]) -> str:
    checked = f"; checked against {r['verified_by']}" if r.get("verified_by") else "; unverified (one source)"
    return f"{r['published_model']}: {r['source']}{checked}"


def _context(report: dict[str, Any]) -> list[str]:
    """The lines under a table: scorer, predictions file, notes, published sources."""
    lines = [_scorer_line(report["scorer"])] if report.get("scorer") else []  # older reports have none
    if report.get("predictions_file"):
        lines.append(f"predictions: {report['predictions_file']}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines + [f"published: {s}" for s in sorted({_source_line(r) for r in report["rows"] if r["source"]})]


def _gap(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _published(r: dict[str, Any]) -> str:
    if r["published"] is None:
        return "—"
    return f"{r['published']:.2f}" + ("" if r.get("verified_by") else "?")


def table(report: dict[str, Any]) -> str:
    """The terminal table; a published number marked '?' has a single source (unverified)."""
    head = f"{report['title']} {report['split']} — {report['model']}, {report['n']} items"
    lines = [head, f"{'metric':<26} {'score':>8} {'published':>10} {'gap':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['metric']:<26} {r['score']:>8.2f} {_published(r):>10} {_gap(r['gap']):>8}")
    return "\n".join(lines + _context(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"### {report['title']} ({report['split']}), {report['model']}, {report['n']} items", "",
             "| metric | score | published | gap | published for |", "| --- | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        who = f"{r['published_model']} ({r['source']})" if r["source"] else "—"
        lines.append(f"| {r['metric']} | {r['score']:.2f} | {_published(r)} | {_gap(r['gap'])} | {who} |")
    return "\n".join(lines + [""] + [f"- {x}" for x in _context(report)]) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", markdown(report))


def load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read report {path}: {e}") from None
    if not isinstance(report, dict) or "rows" not in report:
        raise UsageError(f"{path} is not a report.json written by cogvlm eval")
    return report


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two runs side by side (e.g. bf16 vs int4): every metric either has, and B - A."""
    if (a["task"], a["split"]) != (b["task"], b["split"]):
        raise UsageError(f"the reports are of different benchmarks: {a['task']} {a['split']} vs "
                         f"{b['task']} {b['split']}")
    sa = {r["metric"]: r["score"] for r in a["rows"]}
    sb = {r["metric"]: r["score"] for r in b["rows"]}
    lines = [f"{a['title']} {a['split']}: A = {names[0]} ({a['model']}, {a['n']} items), "
             f"B = {names[1]} ({b['model']}, {b['n']} items)",
             f"{'metric':<26} {'A':>8} {'B':>8} {'B - A':>8}"]
    scorers = [(r.get("scorer") or {}).get("name") for r in (a, b)]
    if scorers[0] != scorers[1]:
        lines.insert(1, f"note: the runs were scored differently (A: {scorers[0]}, B: {scorers[1]})")
    for m in list(sa) + [m for m in sb if m not in sa]:
        va, vb = sa.get(m), sb.get(m)
        fa = "—" if va is None else f"{va:.2f}"
        fb = "—" if vb is None else f"{vb:.2f}"
        lines.append(f"{m:<26} {fa:>8} {fb:>8} {_gap(None if va is None or vb is None else round(vb - va, 2)):>8}")
    return "\n".join(lines)
