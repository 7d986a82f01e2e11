"""The benchmarks' official metrics, written to match the publishers' evaluation code line by line.

- VQAv2 / OK-VQA (GT-Vision-Lab `vqaEval.py`): the prediction is always normalized (punctuation,
  then digits/articles/contractions); the ten ground-truth answers only get the punctuation pass,
  and only when they disagree. Score: min(#other annotators who gave it / 3, 1), averaged over the
  ten leave-one-out subsets.
- TextVQA (`m4c_evaluator.TextVQAAccuracyEvaluator`) and VizWiz (EvalAI's VQA answer processor):
  both the prediction and every ground truth go through EvalAI's processor (lower-case, drop ','
  and '?', split "'s", then the same punctuation and digit/article passes), same leave-one-out rule.
- Captioning: CIDEr-D and BLEU-4 from `pycocoevalcap` on text tokenized by `ptb_tokenize`, a
  Java-free stand-in for the Stanford PTBTokenizer the COCO toolkit runs (docs/eval.md measures the
  difference). METEOR and SPICE need Java and are not computed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import harmonic_mean
from typing import Iterable, Mapping, Sequence

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
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the official code
_COMMA_NUM = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
_COMMA_NUM_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAI's answer processor
_PERIOD_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as sub()'s count argument


def process_punctuation(text: str, comma_num: re.Pattern = _COMMA_NUM) -> str:
    """vqaEval.processPunctuation: every test looks at the input, not the text being rewritten."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or comma_num.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalization of a predicted answer (white space, punctuation, digits, articles)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_normalize(answer: str) -> str:
    """EvalAI's VQA answer processor (used by TextVQA's and VizWiz's evaluations)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, _COMMA_NUM_EVALAI))


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    scores = [min(1.0, sum(g == pred for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's rule exactly as vqaEval.py computes it (ten annotators, leave-one-out)."""
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(normalize_answer(prediction), gts)


def evalai_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's and VizWiz's rule: everything through EvalAI's processor, then leave-one-out."""
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def exact_match(prediction: str, answer: str) -> float:
    """GQA / TDIUC: the answer string, compared after the VQA normalization of both sides (the
    benchmarks score classifier labels; a generated answer may differ in case or an article)."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def mean_per_type(scores: Iterable[tuple[str, float]]) -> dict[str, float]:
    """TDIUC's arithmetic and harmonic mean-per-type accuracy, plus the plain overall accuracy."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for kind, s in scores:
        by_type[kind].append(s)
    per_type = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    flat = [s for v in by_type.values() for s in v]
    return {"accuracy": sum(flat) / len(flat), "arithmetic_mpt": sum(per_type.values()) / len(per_type),
            "harmonic_mpt": harmonic_mean(per_type.values()) if all(per_type.values()) else 0.0,
            **{f"type/{k}": v for k, v in per_type.items()}}


# ---- yes/no (POPE) -------------------------------------------------------------------------------

def pope_answer(text: str) -> str:
    """POPE's evaluate.py: the first sentence, commas dropped; 'no'/'not'/'No' as a word means no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """(predicted yes/no, label) -> accuracy, precision, recall, F1 and yes-ratio, 'yes' positive."""
    tp = fp = tn = fn = 0
    for pred, label in pairs:
        if pred == "yes":
            tp, fp = tp + (label == "yes"), fp + (label != "yes")
        else:
            tn, fn = tn + (label != "yes"), fn + (label == "yes")
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

PTB_PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}  # pycocoevalcap's list (lower-cased, as -lowerCase makes the brackets)
# what the Java tokenizer turns into the bracket and quote tokens of that list
_PTB_DROPPED = PTB_PUNCTUATION | set('"()[]{}')
_PTB_TOKEN = re.compile(r"""
    \d+(?:[.,:]\d+)+           # 1,000 and 3.5 and 12:30 stay whole
  | (?:mr|mrs|ms|dr|st|jr|sr|mt|vs|etc)\.(?=\s|$)   # titles keep their period
  | o'clock | 'n'                   # PTB's special words
  | (?:[a-z]\.){2,}            # u.s. / a.m. abbreviations keep their periods
  | [a-z0-9]+(?:[-&/][a-z0-9]+)*(?=n't)   # the stem before n't
  | n't | '(?:s|re|ve|ll|m|d)\b
  | [a-z0-9]+(?:[-&/][a-z0-9]+)*          # words, with inner hyphens, slashes, ampersands
  | \.\.\.|--|[^\sa-z0-9]
""", re.VERBOSE)


_PTB_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")


def ptb_tokenize(text: str) -> str:
    """Lower-cased PTB-style tokens without punctuation, joined by spaces: what pycocoevalcap's
    PTBTokenizer (Stanford CoreNLP 3.4.1, -preserveLines -lowerCase) returns, without Java."""
    text = _PTB_SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text.replace("\n", " ").lower())
    tokens = _PTB_TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in _PTB_DROPPED)


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-1..4 (pycocoevalcap's scorers) on ptb_tokenize'd text."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'cogvlm[eval]'") from None
    res = {k: [ptb_tokenize(predictions[k])] for k in references}
    gts = {k: [ptb_tokenize(r) for r in refs] for k, refs in references.items()}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), **{f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}}
