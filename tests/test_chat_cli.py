"""`cogvlm chat`: driven through a pseudo-terminal as a person would, in one-shot and JSON
modes, and on user mistakes; answers must equal the API's for the same inputs (greedy)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cogvlm import CogVLM
from cogvlm.cli.chat import print_stream, save_drawing
from cogvlm.grounding import turn_boxes
from cogvlm.cli import main
from cogvlm.grounding import PALETTE, parse_boxes

EXAMPLES = Path(__file__).resolve().parent.parent / "cogvlm" / "web_examples"
IMAGE_A, IMAGE_B = EXAMPLES / "shapes-4.png", EXAMPLES / "shapes-9.png"
GREEDY = {"top_k": 1, "max_new_tokens": 8}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", "8"]
BOX_QUERY = "Tell me what you see within the designated area [[100,200,500,600]] in the picture."
UMASK = os.umask(0o022)
os.umask(UMASK)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def vlm(tiny_checkpoint: Path) -> CogVLM:
    return CogVLM.from_pretrained(tiny_checkpoint)


def spawn(args: list[str], cwd: Path):
    pexpect = pytest.importorskip("pexpect", reason="pip install 'cogvlm[test]' (pexpect drives the terminal)")
    env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8", LANG="C.UTF-8")
    child = pexpect.spawn(sys.executable, ["-m", "cogvlm", "chat", *args], cwd=str(cwd), env=env,
                          encoding="utf-8", timeout=60, dimensions=(40, 400))
    child.logfile_read = io.StringIO()
    return child


def transcript(child) -> str:
    return ANSI.sub("", child.logfile_read.getvalue()).replace("\r\n", "\n")


def test_interactive_chat_in_a_terminal(vlm, tiny_checkpoint, tmp_path):
    first = vlm.session(IMAGE_A, **GREEDY)
    second = vlm.session(IMAGE_B, **GREEDY)
    expected = [first.ask("Describe the image."), first.ask("Is there a dog?"),
                second.ask("How many objects are there?")]
    assert any(expected), "the tiny model answers nothing here: pick other questions"

    child = spawn(["--model", str(tiny_checkpoint), *GREEDY_FLAGS], tmp_path)
    steps = [("image path or URL", str(IMAGE_A)), ("Human: ", "Describe the image."), ("Human: ", "Is there a dog?"),
             ("Human: ", "clear"), ("image path or URL", str(IMAGE_B)), ("Human: ", "How many objects are there?"),
             ("Human: ", "stop")]
    for prompt, line in steps:
        child.expect_exact(prompt)
        child.sendline(line)
    child.read()  # to the end of its output
    child.close()
    assert child.exitstatus == 0, transcript(child)
    answers = re.findall(r"^CogVLM: (.*?)\n(?=Human: |\(boxes drawn)", transcript(child), re.M | re.S)
    assert answers == expected


def test_image_flag_without_query_starts_the_chat_on_it(vlm, tiny_checkpoint, tmp_path):
    expected = vlm.session(IMAGE_B, **GREEDY).ask("How many objects are there?")
    child = spawn(["--model", str(tiny_checkpoint), "--image", str(IMAGE_B), *GREEDY_FLAGS], tmp_path)
    child.expect_exact("Human: ")  # no question for the image: it was given
    child.sendline("How many objects are there?")
    child.expect_exact("Human: ")
    child.sendline("stop")
    child.read()
    child.close()
    assert child.exitstatus == 0
    assert "image path or URL" not in transcript(child)
    assert re.findall(r"^CogVLM: (.*?)\n", transcript(child), re.M) == [expected]


def test_captions_in_chinese_until_ctrl_d(vlm, tiny_checkpoint, tmp_path):
    child = spawn(["--model", str(tiny_checkpoint), "--chinese", "--no_prompt", *GREEDY_FLAGS], tmp_path)
    child.expect_exact("请输入图像路径或URL")
    child.sendline(str(IMAGE_A))
    child.expect_exact("请输入图像路径或URL")
    child.sendeof()
    child.read()  # to the end of its output
    child.close()
    assert child.exitstatus == 0
    assert re.findall(r"^CogVLM：(.*?)\n", transcript(child), re.M) == [vlm.caption(IMAGE_A, **GREEDY)]


def test_a_bad_image_path_in_the_chat_asks_again(tiny_checkpoint, tmp_path):
    child = spawn(["--model", str(tiny_checkpoint), *GREEDY_FLAGS], tmp_path)
    child.expect_exact("image path or URL")
    child.sendline(str(tmp_path / "missing.png"))
    child.expect_exact("image file not found")
    child.expect_exact("image path or URL")
    child.sendline("stop")
    child.read()  # to the end of its output
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in transcript(child)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(vlm):
    session = vlm.session(IMAGE_A, **GREEDY)
    stream = session.stream("Describe the image.")
    first = next(stream)

    def interrupted():
        yield first
        stream.throw(KeyboardInterrupt)  # raised inside the engine's generator, where SIGINT lands

    out = io.StringIO()
    assert print_stream(interrupted(), out) is False
    assert out.getvalue() == first
    assert session.history == []
    assert session.ask("Is there a dog?") == vlm.session(IMAGE_A, **GREEDY).ask("Is there a dog?")


def test_one_shot_prints_the_answer(vlm, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(tiny_checkpoint), "--image", str(IMAGE_A), "--query", "Describe the image.",
                 *GREEDY_FLAGS]) == 0
    assert capsys.readouterr().out == vlm.chat(IMAGE_A, "Describe the image.", **GREEDY)[0] + "\n"
    assert main(["chat", "--model", str(tiny_checkpoint), "--query", "Is there a dog?", "--template", "vqa",
                 *GREEDY_FLAGS]) == 0
    assert capsys.readouterr().out == vlm.chat(None, "Is there a dog?", template="vqa", **GREEDY)[0] + "\n"


def test_json_mode_draws_the_boxes_of_the_turn(vlm, tiny_checkpoint, tmp_path, capsys):
    draw_dir = tmp_path / "drawn"
    assert main(["chat", "--model", str(tiny_checkpoint), "--image", str(IMAGE_A), "--query", BOX_QUERY,
                 "--json", "--draw-dir", str(draw_dir), *GREEDY_FLAGS]) == 0
    record = json.loads(capsys.readouterr().out)
    answer = vlm.chat(IMAGE_A, BOX_QUERY, **GREEDY)[0]
    assert record["answer"] == answer
    assert record["boxes"] == [{"phrase": p.phrase, "box": [b.x0, b.y0, b.x1, b.y1]}
                               for p in parse_boxes(answer).phrases for b in p.boxes]
    assert record["seconds"] >= 0
    drawn = Path(record["drawn"])
    assert drawn.parent == draw_dir and drawn.name == "shapes-4-boxes-1.png"
    with Image.open(drawn) as img, Image.open(IMAGE_A) as original:
        w, h = img.size
        assert img.getpixel((round(0.1 * w), round(0.4 * h))) == PALETTE[0]  # the asked box's left edge
        # the 112 px scene is drawn 4x as large, pixels kept: labels no longer cover the objects
        assert (w, h) == (448, 448) and original.size == (112, 112)
        assert img.getpixel((4 * 60 + 1, 4 * 60 + 1)) == original.convert("RGB").getpixel((60, 60))
    assert drawn.stat().st_mode & 0o777 == 0o666 & ~UMASK  # as any file the user makes, not 0600

    assert main(["chat", "--model", str(tiny_checkpoint), "--image", str(IMAGE_A), "--query", BOX_QUERY,
                 "--json", "--no-draw", "--draw-dir", str(draw_dir), *GREEDY_FLAGS]) == 0
    assert json.loads(capsys.readouterr().out)["drawn"] is None
    assert sorted(p.name for p in draw_dir.iterdir()) == ["shapes-4-boxes-1.png"]


def test_drawings_go_to_the_user_cache_not_the_working_folder(tiny_checkpoint, tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    run = subprocess.run([sys.executable, "-m", "cogvlm", "chat", "--model", str(tiny_checkpoint), "--image",
                          str(IMAGE_A), "--query", BOX_QUERY, "--json", *GREEDY_FLAGS], cwd=work,
                         env=dict(os.environ, XDG_CACHE_HOME=str(cache)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    drawn = Path(json.loads(run.stdout)["drawn"])
    assert drawn.parent == cache / "cogvlm" / "boxes" and drawn.is_file()
    assert list(work.iterdir()) == []


def test_save_drawing_marks_the_box_edges(tmp_path):
    image = Image.new("RGB", (200, 100), "white")
    phrases = turn_boxes("What is this?", "a red circle [[100,200,300,400]] and a cup [[500,500,900,900]]")
    first = save_drawing(image, phrases, tmp_path / "out", "photo")
    second = save_drawing(image, phrases, tmp_path / "out", "photo")
    assert (first.name, second.name) == ("photo-boxes-1.png", "photo-boxes-2.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [first.name, second.name]  # no temp files
    with Image.open(first) as drawn:
        assert drawn.format == "PNG"
        for x, y in [(20, 30), (60, 30), (40, 20), (40, 40)]:  # the four edges of box one
            assert drawn.getpixel((x, y)) == PALETTE[0]
        assert drawn.getpixel((180, 70)) == PALETTE[1]  # box two's right edge
        assert drawn.getpixel((40, 30)) == (255, 255, 255)  # inside stays untouched
    assert image.getpixel((20, 30)) == (255, 255, 255)  # the caller's image too


def test_boxes_in_the_question_are_drawn_unlabelled():
    phrases = turn_boxes(BOX_QUERY, "a dog [[001,002,003,004]]")
    assert [(p.phrase, [(b.x0, b.y0, b.x1, b.y1) for b in p.boxes]) for p in phrases] == [
        ("", [(100, 200, 500, 600)]), ("a dog", [(1, 2, 3, 4)])]


def test_a_bad_image_path_exits_2_without_traceback(tiny_checkpoint, tmp_path):
    run = subprocess.run([sys.executable, "-m", "cogvlm", "chat", "--model", str(tiny_checkpoint),
                          "--image", str(tmp_path / "nope.png"), "--query", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"cogvlm chat: error: image file not found: {tmp_path / 'nope.png'}"
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("flags, message", [
    (["--quant", "4", "--fp16", "--device", "cpu"], "quantized models run in bf16"),
    (["--top_p", "5"], "invalid top_p=5.0"),
    (["--max_new_tokens", "0"], "invalid max_new_tokens=0"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--json"], "--json needs --query"),
    (["--no_prompt", "--query", "hi"], "--no_prompt captions with an empty query"),
    (["--query", "hi", "--max_length", "100000000"], "--max_length 100000000 is past this model's 2048 positions"),
])
def test_user_mistakes_give_one_line_and_exit_2(flags, message, tiny_checkpoint, capsys):
    assert main(["chat", "--model", str(tiny_checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm chat: error: ") and message in err and err.count("\n") == 1


def test_an_unknown_model_exits_2(capsys):
    assert main(["chat", "--model", "no-such-model", "--query", "hi"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--top_k", "many"])
    assert exit_.value.code == 2
    assert "argument --top_k/--top-k: invalid int value: 'many'" in capsys.readouterr().err
