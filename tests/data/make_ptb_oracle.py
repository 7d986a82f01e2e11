"""Records pycocoevalcap's tokenizer output for tests/data/ptb_jar_oracle.json (run once, where
java and pycocoevalcap 1.2 are installed; the tests then compare `ptb_tokenize` with the record
and, where java is present, re-run the jar live):

    python -m tests.data.make_ptb_oracle               # re-tokenize the captions stored in the file
    python -m tests.data.make_ptb_oracle --characters  # print the jar's deleted-character ranges
                                                       # (cogvlm/eval/ptb_deleted.py)

The captions are in the file: hand-written cases (accents, dashes, brackets, repeated punctuation,
signs, abbreviations, quotes, clitics, numbers, symbols, URLs, emoticons, white space) and
realistic captions; each is tokenized by `java_ptb_tokenize`, which runs pycocoevalcap's jar with
pycocoevalcap's class, flags and punctuation filter.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

from cogvlm.eval import metrics as M

ORACLE = Path(__file__).with_name("ptb_jar_oracle.json")


def _jar() -> Path:
    jar = M.ptb_jar()
    if jar is None:
        sys.exit("needs java on PATH and pycocoevalcap 1.2 (pip install 'cogvlm[eval]')")
    return jar


def retokenize() -> None:
    data = json.loads(ORACLE.read_text(encoding="utf-8"))
    captions = [c for c, _ in data["cases"]]
    data["cases"] = [list(pair) for pair in zip(captions, M.java_ptb_tokenize(captions, _jar()))]
    ORACLE.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


def deleted_ranges() -> str:
    """Every assigned BMP non-letter above U+007F that the jar turns "a X b" into "a b", less the
    in-word hyphens U+00AD, U+2010, U+2011 (ptb_tokenize's rules handle them)."""
    chars = [chr(cp) for cp in range(0x80, 0x10000)
             if unicodedata.category(chr(cp)) not in ("Cn", "Co", "Cs", "Lu", "Ll", "Lt", "Lm", "Lo")]
    out = M.java_ptb_tokenize([f"a {c} b" for c in chars], _jar())
    gone = [ord(c) for c, o in zip(chars, out) if o == "a b" and c not in "\u00ad\u2010\u2011"]
    ranges: list[list[int]] = []
    for cp in gone:
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in ranges)


if __name__ == "__main__":
    print(deleted_ranges()) if "--characters" in sys.argv else retokenize()
