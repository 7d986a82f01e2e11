"""The official metrics on fixtures whose scores are known independently: hand-computed VQA cases
(normalization corners, annotator saturation, the official code's quirks), pycocoevalcap's own
scorers, captions tokenized by the Java PTBTokenizer, POPE, TDIUC, REC boxes, the refs pickle."""

from __future__ import annotations

import os
import pickle

import pytest

from cogvlm.eval import metrics as M
from cogvlm.eval.formats.grounding import load_refs
from cogvlm.grounding import Box
from cogvlm.errors import UsageError


@pytest.mark.parametrize("prediction, answers, expected", [
    # saturation: k of the 10 annotators agree; leave-one-out over 10 subsets, min(matches / 3, 1)
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # every subset keeps >= 3 "red"
    ("red", ["red"] * 3 + ["blue"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    ("red", ["red"] * 2 + ["blue"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
    ("red", ["red"] * 1 + ["blue"] * 9, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3
    ("green", ["red"] * 5 + ["blue"] * 5, 0.0),
    # numbers: the prediction's number words become digits
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),
    ("Ten", ["10"] * 5 + ["9"] * 5, 1.0),
    # articles are dropped from the prediction
    ("a dog", ["dog"] * 5 + ["cat"] * 5, 1.0),
    ("The dog.", ["dog"] * 5 + ["cat"] * 5, 1.0),
    # contractions are restored in the prediction ("dont" -> "don't"); the answers keep theirs
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),
    ("isnt", ["isn't"] * 10, 1.0),
    # punctuation: "!" and "?" become spaces (no neighbouring space) or vanish; periods go unless decimal
    ("yes!", ["yes"] * 10, 1.0),
    ("3.5", ["3.5"] * 4 + ["3"] * 6, 1.0),
    ("1,000", ["1000"] * 4 + ["100"] * 6, 1.0),  # a digit-comma-digit removes every punctuation mark
    ("left-hand", ["left hand"] * 4 + ["left"] * 6, 1.0),  # "-" becomes a space
    ("left-hand", ["left-hand"] * 10, 0.0),  # unanimous answers are not normalized at all (vqaEval.py)
    # the answers get only the punctuation pass, and only when they disagree
    ("two", ["Two"] * 10, 0.0),  # unanimous: not even lower-cased, so "2" never matches "Two"
    ("yes", ["yes!"] * 4 + ["no"] * 6, 0.0),  # disagreeing: "yes!" -> "yes " (the space stays), never "yes"
    ("yes", ["yes."] * 4 + ["no"] * 6, 1.0),  # the period is removed outright
])
def test_vqa_accuracy_hand_computed(prediction, answers, expected):
    """GT-Vision-Lab vqaEval.py at 458a8b2 (the rule this table was written for)."""
    assert M.vqa_2016_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_normalization_corners():
    assert M.normalize_answer("  The Two dogs.\n") == "2 dogs"
    assert M.normalize_answer("an apple, a pear") == "apple pear"  # ", " is next to a space: removed
    assert M.normalize_answer("whats up") == "what's up"
    assert M.normalize_answer("none") == "0"
    assert M.normalize_answer("3.5.") == "3.5"


def test_textvqa_m4c_uses_evalai_normalization_on_both_sides():
    # EvalAI lower-cases the answers too, and drops "," and "?" before the punctuation pass
    assert M.m4c_accuracy("COCA-COLA", ["Coca Cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)
    assert M.m4c_accuracy("two", ["Two"] * 10) == 1.0  # where VQAv2's rule gives 0
    assert M.evalai_normalize("It's 1,000?") == "it 's 1000"
    # the same under VizWiz's own API (the prediction is normalized, the answers are already lower case)
    for rule in (M.m4c_accuracy, M.vizwiz_accuracy):
        assert rule("unanswerable", ["unanswerable"] * 2 + ["milk"] * 8) == pytest.approx(0.6)


def test_exact_match_and_tdiuc_means():
    # what was the default before: kept as --scorer lenient
    assert M.lenient_exact("Yes.", "yes") == 1.0 and M.lenient_exact("two", "2") == 1.0
    assert M.lenient_exact("red car", "red") == 0.0
    # GQA's eval.py: `predicted == gold` on the raw strings
    assert M.exact_match("Yes.", "yes") == 0.0 and M.exact_match("two", "2") == 0.0
    assert M.exact_match("red car", "red") == 0.0 and M.exact_match("red", "red") == 1.0
    scores = [("color", "red", 1.0), ("color", "blue", 0.0), ("counting", "2", 1.0), ("counting", "2", 1.0),
              ("absurd", "doesnotapply", 0.0), ("absurd", "doesnotapply", 1.0), ("absurd", "doesnotapply", 1.0),
              ("absurd", "yes", 1.0)]
    out = M.mean_per_type(scores)
    assert out["accuracy"] == pytest.approx(6 / 8)
    assert out["type/color"] == 0.5 and out["type/counting"] == 1.0 and out["type/absurd"] == 0.75
    assert out["arithmetic_mpt"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    assert out["harmonic_mpt"] == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.75))
    # normalized (TDIUC's N-MPT): absurd = mean(doesnotapply 2/3, yes 1) = 5/6; color = mean(1, 0) = 1/2
    assert out["arithmetic_nmpt"] == pytest.approx((0.5 + 1.0 + 5 / 6) / 3)
    assert out["harmonic_nmpt"] == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 6 / 5))
    assert M.mean_per_type([("a", "x", 0.0), ("b", "y", 1.0)])["harmonic_mpt"] == 0.0


def test_pope_answer_parsing_and_metrics():
    assert M.pope_answer("No, there is not.") == "no"
    assert M.pope_answer("Yes. But not a red one.") == "yes"  # only the first sentence counts
    assert M.pope_answer("There is no cat") == "no" and M.pope_answer("yes") == "yes"
    assert M.pope_answer("Nope") == "yes"  # POPE's word test, not a guess
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] + [("no", "no")] * 4 + [("no", "yes")] * 2  # TP3 FP1 TN4 FN2
    out = M.pope_metrics(pairs)
    precision, recall = 3 / 4, 3 / 5
    assert out == pytest.approx({"accuracy": 7 / 10, "precision": precision, "recall": recall,
                                 "f1": 2 * precision * recall / (precision + recall), "yes_ratio": 4 / 10})


def test_rec_boxes_convert_with_the_image_size():
    # a 200 x 100 image: thousandths scale x by 0.2 and y by 0.1
    box = M.box_to_pixels(Box(250, 500, 750, 999), 200, 100)
    assert box == pytest.approx((50.0, 50.0, 150.0, 99.9))
    truth = M.xywh_to_corners(50, 50, 100, 50)  # COCO [x, y, w, h]
    assert M.pixel_iou(box, truth) == pytest.approx((100 * 49.9) / (100 * 50))
    half = M.xywh_to_corners(100, 50, 100, 50)  # overlaps the right half only
    assert M.pixel_iou(box, half) == pytest.approx((50 * 49.9) / (100 * 49.9 + 100 * 50 - 50 * 49.9))


def test_caption_scores_equal_pycocoevalcap_on_the_same_tokenized_input():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = {"1": ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.", "Man surfing."],
            "2": ["Two dogs play with a frisbee in the park.", "Dogs playing in the grass."],
            "3": ["A red stop sign at an intersection.", "A stop sign on a street corner."]}
    preds = {"1": "a man surfing a wave.", "2": "two dogs playing in a park", "3": "A stop sign at the corner."}
    ours = M.caption_scores(preds, refs)
    gts = {k: [M.ptb_tokenize(r) for r in v] for k, v in refs.items()}
    res = {k: [M.ptb_tokenize(v)] for k, v in preds.items()}
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [ours[f"bleu{i}"] for i in range(1, 5)] == pytest.approx(bleu, abs=1e-9)
    # independently known: a hypothesis equal to its only reference has BLEU-4 = 1
    same = M.caption_scores({"a": "a red circle on a white table"}, {"a": ["A red circle on a white table."]})
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)


class _Boom:
    marker = "pwned"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refs_pickle_is_read_without_running_code(tmp_path):
    good = tmp_path / "refs(unc).p"
    refs = [{"ref_id": 1, "ann_id": 7, "image_id": 3, "split": "val", "category_id": 1,
             "sentences": [{"sent_id": 0, "sent": "the man", "raw": "The man", "tokens": ["the", "man"]}]}]
    good.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs(good) == refs
    bad = tmp_path / "evil.p"
    boom = _Boom()
    boom.marker = str(tmp_path / "pwned")
    bad.write_bytes(pickle.dumps([boom], protocol=2))
    # refused while its opcodes are walked, before anything is unpickled: GLOBAL is not plain data
    with pytest.raises(UsageError, match="not a plain-data refs pickle.*GLOBAL"):
        load_refs(bad)
    assert not (tmp_path / "pwned").exists()


def test_pope_per_category_rows_for_vlmevalkit_files():
    from cogvlm.eval.formats import Item
    from cogvlm.eval.scorers import score_pope

    items = [Item(str(i), b"", {}, [label], {"category": cat}) for i, (label, cat) in
             enumerate([("yes", "random"), ("no", "random"), ("yes", "adversarial"), ("no", "adversarial")])]
    preds = {"0": "Yes.", "1": "No.", "2": "No, there is not.", "3": "There is no such thing."}
    out = score_pope(items, preds, [])
    assert out["accuracy"] == 0.75 and out["accuracy/random"] == 1.0 and out["accuracy/adversarial"] == 0.5
    assert out["f1/adversarial"] == 0.0 and out["f1/random"] == 1.0
