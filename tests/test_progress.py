"""Progress off a terminal is plain timed lines; on a terminal, a bar."""

from __future__ import annotations

import io

from cogvlm.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_plain_line_per_interval_and_at_the_end():
    out = io.StringIO()
    progress = Progress(4, "finetune", "step", every=0.0, stream=out)
    progress.update(1, loss="1.5")
    progress.update(3)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[0].startswith("finetune: 1/4 step (") and "eta" in lines[0] and lines[0].endswith(" loss=1.5")
    assert lines[-1].startswith("finetune: 4/4 step (") and "eta" not in lines[-1]

    quiet = io.StringIO()
    progress = Progress(4, "finetune", "step", every=3600.0, stream=quiet)
    progress.update(2)
    progress.update(2)
    progress.close()
    assert quiet.getvalue().count("\n") == 1  # nothing until the interval passes, then the end line

    off = io.StringIO()
    progress = Progress(4, "finetune", enabled=False, every=0.0, stream=off)
    progress.update(4)
    progress.close()
    assert off.getvalue() == ""


def test_on_a_terminal_a_bar():
    out = Terminal()
    progress = Progress(4, "finetune", "step", stream=out)
    progress.update(4, loss="0.5")
    progress.close()
    assert "\r" in out.getvalue() and "4/4" in out.getvalue() and "loss=0.5" in out.getvalue()
