"""The prompt each benchmark is asked with, per model family, and where it comes from.

A prompt is a template (docs/spec/cogvlm.md section 5: base / chat / vqa) and a query with {fields} the task's
reader fills in. `--prompt` replaces the query; `--template` the template. docs/eval.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    template: str
    query: str
    source: str


SHORT_ANSWER = Prompt("vqa", "{question}", "the authors' vqa template, 'Question: {q} Short answer:' (docs/spec/cogvlm.md §5)")
# cogagent-vqa answers VQA benchmarks in the chat_old template (docs/spec/cogagent.md §2 and §11)
COGAGENT_VQA = Prompt("chat", "{question}", "cogagent-vqa's chat_old template, 'Question: {q} Answer:' (docs/spec/cogagent.md §11)")

PROMPTS: dict[str, dict[str, Prompt]] = {
    "short_answer": {"cogvlm": SHORT_ANSWER, "cogagent": COGAGENT_VQA},
    "caption": {"cogvlm": Prompt("base", "", "the base template with an empty query: plain captioning, the authors' "
                                             "--no_prompt demo of cogvlm-base-224/490 (docs/spec/cogvlm.md §5)")},
    "rec": {"cogvlm": Prompt("base", "Where is {expression}? answer in [[x0,y0,x1,y1]] format.",
                             "the authors' referring-expression prompt (docs/spec/cogvlm.md §6)")},
    "pointing": {"cogvlm": Prompt("base", "{question} Answer with one of these boxes: {candidates}.",
                                  "ours: the authors did not publish their Visual7W prompt")},
    "choice": {"cogvlm": Prompt("vqa", "{context}{question}\n{options}\nAnswer with the option's letter from the "
                                       "given choices directly.",
                                "LLaVA-1.5's ScienceQA instruction in the vqa template; the authors did not publish theirs")},
    "yes_no": {"cogvlm": Prompt("vqa", "{question}", "POPE's question as is, in the vqa template (docs/spec/cogvlm.md §5)")},
}


def family(model: str) -> str:
    """'cogagent' for CogAgent checkpoints, else 'cogvlm' (CogVLM and CogVLM2 share the templates)."""
    return "cogagent" if "cogagent" in str(model).lower() else "cogvlm"


def prompt_for(kind: str, model: str, query: str | None = None, template: str | None = None) -> Prompt:
    """The documented prompt for this kind of task and model, with the user's overrides."""
    by_family = PROMPTS[kind]
    chosen = by_family.get(family(model), by_family["cogvlm"])
    if query is None and template is None:
        return chosen
    return Prompt(template or chosen.template, chosen.query if query is None else query, "--prompt / --template")
