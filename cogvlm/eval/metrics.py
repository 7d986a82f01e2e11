"""The benchmarks' official scoring rules, each written from its publisher's evaluation code (the
rules and tables are facts taken from that code; the code here is ours). docs/eval.md names each
source with its repository and commit; tests/test_eval_metrics.py checks each rule's corners.

- `vqa_2016_accuracy`: GT-Vision-Lab/VQA `vqaEval.py` at 458a8b2 (2016): the prediction is always
  normalized (punctuation, then digits/articles/contractions); the ten ground-truth answers are
  compared as stored, except for the punctuation pass when they disagree.
- `vqa_2021_accuracy`: the same repository at a013f00 (2021, "Fixed processing answers bug"): the
  ground truths are stripped; when they disagree, both sides get both passes; when they are
  unanimous, neither side is normalized at all.
- `evalai_challenge_accuracy`: Cloud-CV/VQA-Challenge (the code EvalAI runs for VQAv2 test-dev):
  the 2016 flow with a regex punctuation pass that strips leading and trailing punctuation.
- `m4c_accuracy`: TextVQA's `m4c_evaluator` (EvalAI's answer processor on both sides).
- `vizwiz_accuracy`: the VizWiz-VQA API: only the prediction is normalized, with a contraction table
  in curly apostrophes; the ground truths are compared as stored.
- `exact_match` / `lenient_exact`: GQA's `eval.py` compares raw strings; the lenient variant
  normalizes both sides (never a default).
- Every ten-answer rule ends in the same leave-one-out average of min(#others agreeing / 3, 1).
- Captioning: CIDEr-D and BLEU from `pycocoevalcap` on text tokenized by pycocoevalcap's own Java
  PTBTokenizer when Java is on PATH, else by `ptb_tokenize`, a Java-free stand-in (docs/eval.md
  lists where the two agree and where they do not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import defaultdict
from pathlib import Path
from statistics import harmonic_mean
from typing import Iterable, Mapping, Sequence

from .ptb_deleted import DELETED_BMP

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one backwards
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _curly(text: str) -> str:
    return text.replace("'", "\u2019")


# The VizWiz API's table is the same one typed with curly apostrophes (U+2019), except these
# entries, which kept the straight one in the key or in the value.
_VIZWIZ_STRAIGHT_KEYS = {"couldn'tve", "hadn'tve"}
_VIZWIZ_STRAIGHT_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
VIZWIZ_CONTRACTIONS = {(k if k in _VIZWIZ_STRAIGHT_KEYS else _curly(k)): (v if k in _VIZWIZ_STRAIGHT_VALUES else _curly(v))
                       for k, v in CONTRACTIONS.items()}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the official code
_COMMA_NUM = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
_COMMA_NUM_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAI's answer processor and the challenge code
_PERIOD_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as sub()'s count argument

# Cloud-CV/VQA-Challenge's regex punctuation pass; P is its class of punctuation characters
_P = r"\\;/\"`\[\](){}<>@=+_\-,?!"
_CH_BEGIN = re.compile(r"\A([ " + _P + r"]+)(?=[a-zA-Z0-9 ])")  # leading run, when text follows
_CH_END = re.compile(r"(?<=[a-zA-Z0-9 ])([ " + _P + r"]+)\Z")  # trailing run, after text
_CH_NEXT_TO_PUNCT = re.compile(r"(?<=[ " + _P + r"])([" + _P + r"])|([" + _P + r"])(?=[ " + _P + r"])")
_CH_SPACES = re.compile(r"([ ]+)")
_CH_BETWEEN_LETTERS = re.compile(r"(?<=[a-zA-Z])([" + _P + r"])(?=[a-zA-Z])")


def process_punctuation(text: str, comma_num: re.Pattern = _COMMA_NUM) -> str:
    """vqaEval.processPunctuation: every test looks at the input, not the text being rewritten."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or comma_num.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def challenge_punctuation(text: str) -> str:
    """The VQA-Challenge processPunctuation: strip leading/trailing punctuation runs, drop commas
    inside numbers, turn punctuation next to a space or punctuation into a space, squeeze spaces,
    split letter-punctuation-letter, then the periods. (Its second pass over letter-punctuation-
    letter, with "", can match nothing after the first and is not repeated here.)"""
    out = _CH_BEGIN.sub("", text)
    out = _CH_END.sub("", out)
    out = _COMMA_NUM_EVALAI.sub("", out)
    out = _CH_NEXT_TO_PUNCT.sub(" ", out)
    out = _CH_SPACES.sub(" ", out)
    out = _CH_BETWEEN_LETTERS.sub(" ", out)
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    """What every official evaluator does first to the prediction: tabs and newlines to spaces, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """vqaEval.py's normalization of a predicted answer (white space, punctuation, digits, articles)."""
    return process_digit_article(process_punctuation(_clean(answer)))


def evalai_normalize(answer: str) -> str:
    """EvalAI's VQA answer processor (m4c_evaluator.EvalAIAnswerProcessor, used by TextVQA)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_clean(text), _COMMA_NUM_EVALAI))


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    """The mean over the ten leave-one-annotator-out subsets of min(#matching / 3, 1). Every
    official version drops one answer by position (VQA: each answer dict has its own answer_id)."""
    scores = [min(1.0, sum(g == pred for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores) if scores else 0.0


def vqa_2016_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """GT-Vision-Lab vqaEval.py at 458a8b2: the ground truths are used as stored (not stripped),
    with only the punctuation pass, and only when they disagree."""
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(normalize_answer(prediction), gts)


def vqa_2021_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """GT-Vision-Lab vqaEval.py at a013f00: ground truths cleaned like the prediction; if they
    disagree both sides get punctuation + digits/articles, if unanimous neither side does (so
    'Yes' no longer matches ten 'yes', and 't-shirt' now matches ten 't-shirt')."""
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return _leave_one_out(pred, gts)


def evalai_challenge_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Cloud-CV/VQA-Challenge vqaEval.py (EvalAI's VQAv2 server): the 2016 flow with the regex
    punctuation pass, so a ground truth 'yes!' among disagreeing answers becomes 'yes'."""
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [challenge_punctuation(a) for a in gts]
    return _leave_one_out(process_digit_article(challenge_punctuation(_clean(prediction))), gts)


def m4c_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's m4c_evaluator.TextVQAAccuracyEvaluator: everything through EvalAI's processor."""
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VizWiz-VQA API (vqaEval.py of the VizWiz Python API): the prediction gets vqaEval's
    passes with the curly-apostrophe contraction table ('dont' -> 'don\u2019t'); the ground truths
    are compared exactly as stored (no case folding, no stripping)."""
    pred = process_digit_article(process_punctuation(_clean(prediction)), VIZWIZ_CONTRACTIONS)
    return _leave_one_out(pred, list(answers))


def exact_match(prediction: str, answer: str) -> float:
    """GQA's eval.py: `predicted == gold`, the raw strings."""
    return float(prediction == answer)


def lenient_exact(prediction: str, answer: str) -> float:
    """Not an official rule: both sides through vqaEval's normalization (case, punctuation,
    number words, articles). Kept as `--scorer lenient`, always labelled so in the report."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _means(per_type: Mapping[str, float], prefix: str) -> dict[str, float]:
    """TDIUC's arithmetic and harmonic mean over the question types (a type at 0 makes the
    harmonic mean 0; TDIUC's script adds 1e-10 to each, which rounds to the same)."""
    values = list(per_type.values())
    return {f"arithmetic_{prefix}": sum(values) / len(values),
            f"harmonic_{prefix}": harmonic_mean(values) if all(values) else 0.0}


def mean_per_type(scores: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """TDIUC's metrics from (question type, ground-truth answer, score) per question: the plain
    accuracy, the mean-per-type (MPT) accuracies, and the normalized ones (N-MPT: within a type,
    the mean over its distinct answers of each answer's accuracy, so frequent answers do not
    dominate)."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answer: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for kind, answer, s in scores:
        by_type[kind].append(s)
        by_answer[kind][answer].append(s)
    per_type = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    normalized = {k: sum(sum(v) / len(v) for v in answers.values()) / len(answers) for k, answers in by_answer.items()}
    flat = [s for v in by_type.values() for s in v]
    return {"accuracy": sum(flat) / len(flat), **_means(per_type, "mpt"), **_means(normalized, "nmpt"),
            **{f"type/{k}": v for k, v in per_type.items()}}


# ---- yes/no (POPE) -------------------------------------------------------------------------------

def pope_answer(text: str) -> str:
    """POPE's evaluate.py: the first sentence, commas dropped; 'no'/'not'/'No' as a word means no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """(predicted yes/no, label) -> accuracy, precision, recall, F1 and yes-ratio, 'yes' positive.
    A label is negative when it reads 'no' (POPE's evaluate.py), in any case: VLMEvalKit's TSV
    writes 'Yes'/'No'."""
    tp = fp = tn = fn = 0
    for pred, label in pairs:
        positive = label.strip().lower() != "no"
        if pred == "yes":
            tp, fp = tp + positive, fp + (not positive)
        else:
            tn, fn = tn + (not positive), fn + positive
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / total}


# ---- boxes --------------------------------------------------------------------------------------

PixelBox = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def box_to_pixels(box, width: int, height: int) -> PixelBox:
    """A 0-999 CogVLM box (thousandths of the image side, docs/spec/cogvlm.md section 6) in image pixels."""
    return (box.x0 * width / 1000, box.y0 * height / 1000, box.x1 * width / 1000, box.y1 * height / 1000)


def xywh_to_corners(x: float, y: float, w: float, h: float) -> PixelBox:
    """COCO-style [x, y, width, height] to corners."""
    return (x, y, x + w, y + h)


def pixel_iou(a: PixelBox, b: PixelBox) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---- captions -----------------------------------------------------------------------------------

# pycocoevalcap's PTBTokenizer drops these tokens after Stanford CoreNLP 3.4.1's PTBTokenizer ran
# with -lowerCase. The bracket entries are upper case, so the lower-cased -lrb- -rrb- -lcb- -rcb-
# the jar writes are never dropped: they stay in the text CIDEr and BLEU see.
PTB_PUNCTUATION = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";")
PTB_JAR = "stanford-corenlp-3.4.1.jar"

# What the jar rewrites before tokenizing: brackets to their PTB names, dashes to "--", some
# currencies to "$", "#" or "cents", vulgar fractions to digits, quotes to `` and ''.
_PTB_REWRITE = str.maketrans({
    "(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- ",
    "\u2013": " -- ", "\u2014": " -- ", "\u20ac": " $ ", "\u00a4": " $ ", "\u20a0": " $ ", "\x80": " $ ",
    "\u00a3": " # ", "\u00a2": " cents ", "\u00bd": " 1/2 ", "\u00bc": " 1/4 ", "\u00be": " 3/4 ",
    "\u2153": " 1/3 ", "\u2154": " 2/3 ", '"': " `` ", "\u201c": " `` ", "\u201d": " '' ", "\u2018": " ` ",
    "\u2019": "'"})
# characters the jar drops (cogvlm/eval/ptb_deleted.py), and its in-word hyphens when they stand alone
_PTB_DELETED = re.compile(f"[{DELETED_BMP}\U00010000-\U0010ffff]|(?<![^\\W_])[\u00ad\u2010\u2011]"
                          f"|[\u00ad\u2010\u2011](?![^\\W_])")
# "AT&T", "R&D" (capitals only, as the jar's rule) stay one token: the "&" is held as U+E000 meanwhile
_PTB_CAPITALS_AND = re.compile(r"(?<![^\W_])([A-Z]+)&([A-Z]+)")
# words the jar splits in two: can not, gon na, wan na, got ta, gim me, lem me, 't is, 't was
_PTB_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b|\b(gim|lem)(me)\b|(?<!\S)('t)(is|was)\b")
# a letter (any script, with its combining accents) and a letter or decimal digit; superscripts,
# vulgar fractions and other numerals are tokens of their own, as in the jar
_NOT_DECIMAL = "".join(c for c in map(chr, range(0x80, 0x10000))
                       if unicodedata.category(c) in ("No", "Nl"))
_L = rf"(?:(?![{_NOT_DECIMAL}\d])[^\W_]|[\u0300-\u036f])"
_LD = rf"(?:(?![{_NOT_DECIMAL}])[^\W_]|[\u0300-\u036f])"
_WORD = rf"{_LD}+(?:[-_\u00ad\u2010\u2011]{_LD}+)*"
# ":)" ":-(" ";)" "=)" become one token with the bracket's name (":-rrb-"); ":d" ":p" likewise
_PTB_EMOTICON = re.compile(rf"([:;=]-?)([()])(?!{_LD})|([:;=]-?[dDpP])(?!{_LD})")
_PTB_ABBREVIATIONS = ("mr|mrs|ms|dr|prof|gen|capt|lt|col|sgt|rev|gov|sen|st|jr|sr|mt|vs|etc|inc|ltd|co|corp|bros"
                      "|dept|est|ave|blvd|fig|pp|ft|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec|ph\\.d")
_PTB_TOKEN = re.compile(rf"""
    -(?:lrb|rrb|lsb|rsb|lcb|rcb)-                   # bracket names (made above)
  | [:;=]-?-[lr]rb- | [:;=]-?[dp](?!{_LD})           # emoticons
  | https?://[^\s"<>|]*[^\s"<>|.!?,-]               # URLs
  | www\.(?:[a-z0-9-]+\.)+[a-z]{{2,4}}\b(?:/[!#-;=?-~]*[a-z0-9])?
  | [a-z0-9][^\s"<>|]*@(?:[^\s"<>|.]+\.)*[^\s"<>|.]+   # e-mail addresses (trailing "!" or "," included)
  | @[a-z_]\w* | \#{_L}{_LD}*                       # @handles, hashtags
  | c\+\+ | [cf]\# | [a-z]+\ue000[a-z]+              # names the jar keeps whole; AT&T
  | <[a-z/!?][^<>\n]*>                              # an SGML-like tag: <stop>
  | (?:\d{{1,4}}[- ])?\d{{1,4}}/\d{{1,4}}(?![\d/])       # fractions: 3/4  24/7  "1 3/4" (one token)
  | [-+]?\d*(?:[.,:]\d+)+(?:-\d+(?:[.,:]\d+)*)* | [-+]\d+   # numbers: 1,000  3.5  .5  12:30  3.5-5  -5  +3
                                                    # (a sign anywhere)
  | (?:{_PTB_ABBREVIATIONS})\.(?!{_L}) | no\.(?=\s*\d|[,;:])   # abbreviations ("no." as the jar has it)
  | (?:{_L}\.){{2,}}(?!{_L}) | {_L}\.(?!{_L})       # u.s.a.  e.g.  and a lone letter's period: "b."
  | o'clock(?!{_LD}) | 'n' | 'n(?!{_LD}) | 'em | '[2-9]0s | 't(?=\s)   # PTB's special words
  | [a-hj-xz]'{_L}{{2,}}{_LD}* | {_L}+[aeiouy]'[aeiou]{_LD}* | y'(?={_L})   # o'neil  ma'am  y' all
  | {_WORD}(?=n't) | n't | '(?:s|re|ve|ll|m|d)(?![a-z])      # the stem before n't, and the clitics
  | {_L}{_LD}*(?:[.!?]{_L}{_LD}*)+(?:-{_LD}+)* | [a-z0-9]+(?:/[a-z0-9]+)+ | {_WORD}   # words: "dog.a" and
                                                    # "www.x.com" stay whole, "tv/dvd" (ASCII) too;
                                                    # inner hyphens and underscores join
  | \.\.\.|--|``|''|[!?]+|\*+|\S                    # punctuation; any other character is a token
""", re.VERBOSE)
_PTB_DROPPED = {t.lower() for t in PTB_PUNCTUATION} - {"-lrb-", "-rrb-", "-lcb-", "-rcb-"}
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def _emoticon(m: re.Match) -> str:
    """':)' -> ' :-rrb- ', ':-(' -> ' :--lrb- ', ':D' -> ' :d ' (the jar's emoticon tokens)."""
    if m.group(3):
        return f" {m.group(3).lower()} "
    return f" {m.group(1)}{'-rrb-' if m.group(2) == ')' else '-lrb-'} "


def ptb_tokenize(text: str) -> str:
    """pycocoevalcap's tokenization (CoreNLP 3.4.1 PTBTokenizer, -preserveLines -lowerCase, then
    its punctuation filter) without Java. tests/data/ptb_jar_oracle.json holds the captions it is
    checked on against the jar (accents, dashes, brackets, repeated punctuation, signs,
    abbreviations, ...); docs/eval.md lists the known differences."""
    text = _PTB_CAPITALS_AND.sub(" \\1\ue000\\2 ", _PTB_EMOTICON.sub(_emoticon, text.translate(_LINE_BREAKS)))
    text = _PTB_DELETED.sub(" ", text.lower().translate(_PTB_REWRITE))
    text = _PTB_SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    # the jar writes the space inside a one-token "1 3/4" as U+00A0
    tokens = (t.replace("\ue000", "&").replace(" ", "\u00a0") for t in _PTB_TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in _PTB_DROPPED)


def ptb_jar() -> Path | None:
    """pycocoevalcap's CoreNLP jar when it and a `java` are available, else None."""
    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).parent / PTB_JAR
    return jar if jar.is_file() else None


def java_ptb_tokenize(texts: Sequence[str], jar: Path) -> list[str]:
    """pycocoevalcap's PTBTokenizer.tokenize, run on one file for all texts: the same jar, class
    and flags, one caption per line, then its punctuation filter (case-sensitive, as there). We
    also turn \\r and Unicode line breaks into spaces (pycocoevalcap replaces only \\n, and the
    jar would split a caption on the others) and set the JVM's charset to UTF-8."""
    fd, name = tempfile.mkstemp(suffix=".txt", text=False)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(t.translate(_LINE_BREAKS) for t in texts).encode("utf-8"))
        run = subprocess.run(["java", "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", name], capture_output=True, check=False)
    finally:
        os.unlink(name)
    lines = run.stdout.decode("utf-8").split("\n")
    if run.returncode != 0 or len(lines) < len(texts):
        raise RuntimeError(f"the Java PTBTokenizer failed (exit {run.returncode}): "
                           f"{run.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in lines[:len(texts)]]


def tokenizer_name(java: bool) -> str:
    return f"pycocoevalcap's Java PTBTokenizer ({PTB_JAR})" if java else "ptb_tokenize (Java-free stand-in)"


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   jar: Path | None = None) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-1..4 (pycocoevalcap's scorers) on tokenized text: by the jar when
    one is given (`ptb_jar()`), else by `ptb_tokenize`."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'cogvlm[eval]'") from None
    keys = list(references)
    texts = [predictions[k] for k in keys] + [r for k in keys for r in references[k]]
    tokens = java_ptb_tokenize(texts, jar) if jar is not None else [ptb_tokenize(t) for t in texts]
    res = {k: [tokens[i]] for i, k in enumerate(keys)}
    gts, at = {}, len(keys)
    for k in keys:
        gts[k] = tokens[at:at + len(references[k])]
        at += len(references[k])
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), **{f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}}
