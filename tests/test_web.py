"""`cogvlm web` in a real headless Chromium (Debian's, driven by Playwright): answers streamed
into the page must equal the API's greedy answers, and boxes must be drawn on the image."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from cogvlm import CogVLM
from cogvlm.cli import main
from cogvlm.grounding import PALETTE, drawable
from cogvlm.cli.web import CLOSED, EXAMPLES, SessionPool, load_examples
from cogvlm.errors import UsageError
from tests.processes import free_port, running

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GREEDY = {"top_k": 1, "max_new_tokens": 8}
BOX_QUERY = "Tell me what you see within the designated area [[100,200,500,600]] in the picture."


def test_shipped_examples_are_small_and_complete():
    examples = load_examples(EXAMPLES)
    assert len(examples) >= 3
    assert {e.template for e in examples} >= {"base", "vqa"}
    assert all(e.label for e in examples)
    assert sum(p.stat().st_size for p in EXAMPLES.iterdir()) < 50_000


def test_a_broken_examples_folder_exits_2(tmp_path, capsys):
    assert main(["web", "--examples", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"cogvlm web: error: no examples.json in {tmp_path}\n"
    (tmp_path / "examples.json").write_text('[{"image": "gone.png", "prompt": "", "template": "base", "label": "x"}]')
    assert main(["web", "--examples", str(tmp_path)]) == 2
    assert "image not found" in capsys.readouterr().err


def test_without_gradio_the_message_says_what_to_install(tiny_checkpoint):
    hide_gradio = "import sys; sys.modules['gradio'] = None; from cogvlm.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", hide_gradio, "web", "--model", str(tiny_checkpoint)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "cogvlm web: error: the web demo needs Gradio: pip install 'cogvlm[web]'\n"


def test_the_session_pool_drops_the_least_recently_used():
    """Three places: a fourth conversation drops the one used longest ago, where using means
    asking (get), not only opening; a closed or dropped id answers None (its tab starts over)."""
    pool: SessionPool[str] = SessionPool(3)
    a, b, c = pool.open("a"), pool.open("b"), pool.open("c")
    assert pool.get(a) == "a"  # a is now the most recent: b is the oldest
    d = pool.open("d")
    assert pool.get(b) is None and len(pool) == 3
    assert [pool.get(k) for k in (a, c, d)] == ["a", "c", "d"]  # order now: a, c, d
    pool.close(a)  # Clear or a new image: that tab's cache goes at once
    e = pool.open("e")
    assert len(pool) == 3 and pool.get(c) == "c"  # a freed the place: nothing else dropped
    pool.open("f")
    assert pool.get(d) is None and [pool.get(k) for k in (c, e)] == ["c", "e"]
    assert len({a, b, c, d, e}) == 5  # ids are never reused: a dropped tab cannot read another's session
    with pytest.raises(UsageError, match="--max-sessions must be >= 1"):
        SessionPool(0)


def test_idle_sessions_expire():
    """#37 item 11: before, a conversation kept its cache after its client left, for good. Now
    one unused for `idle` seconds is dropped, on any use of the pool or by the sweeper (expire)."""
    now = [0.0]
    pool: SessionPool[str] = SessionPool(3, idle=60, clock=lambda: now[0])
    a, b = pool.open("a"), pool.open("b")
    now[0] = 50
    assert pool.get(a) == "a"  # used at 50: a lives until 110, b until 60
    now[0] = 61
    pool.expire()
    assert len(pool) == 1 and pool.get(b) is None and pool.get(a) == "a"
    now[0] = 200
    c = pool.open("c")  # opening expires too
    assert pool.get(a) is None and pool.get(c) == "c" and len(pool) == 1


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def rss(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) * 1024


def test_uploads_get_the_server_limits_and_are_deleted_on_exit(tiny_checkpoint, tmp_path):
    """#37 item 11 on a real `cogvlm web`, through Gradio's own client: before, a 530 kB upload
    was decoded by Gradio (type="pil") and resized, 2.5 GB, and uploads stayed on disk after the
    demo stopped. Now an upload is checked as `cogvlm serve` checks images (bytes, header pixels,
    aspect) before it is decoded, and the demo's upload folder is removed when it stops (SIGTERM)."""
    client_module = pytest.importorskip("gradio_client", reason="pip install 'cogvlm[web]'")
    port = free_port()
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    for name, data in (("ok.png", png((64, 48), "RGB")), ("pixels.png", png((7000, 7000))),
                       ("thin.png", png((1, 60))), ("bytes.png", os.urandom(300_000))):
        (tmp_path / name).write_bytes(data)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    args = ["web", "--model", str(tiny_checkpoint), "--port", str(port), "--top_k", "1", "--max_new_tokens", "3",
            "--max-image-bytes", "200000"]
    with running(args, tmp_path / "web.log", listening, timeout=120, env=dict(os.environ, GRADIO_TEMP_DIR=str(uploads))) as proc:
        client = client_module.Client(f"http://127.0.0.1:{port}", verbose=False)

        def ask(name: str):
            return client.predict(client_module.handle_file(str(tmp_path / name)), "What is it?", "chat", 0, 1, 1, 3,
                                  api_name="/respond")

        assert ask("ok.png")[0][-1]["role"] == "assistant"
        before = rss(proc.pid)
        with pytest.raises(Exception, match=r"7000x7000 pixels, over this demo's limit \(--max-image-pixels\)"):
            ask("pixels.png")
        assert rss(proc.pid) - before < 100 * 2**20  # 49 M pixels were never decoded (147 MB as RGB)
        with pytest.raises(Exception, match="more than 50:1"):
            ask("thin.png")
        with pytest.raises(Exception):  # Gradio's max_file_size refuses the upload itself
            ask("bytes.png")
        assert any(p.is_file() for p in uploads.rglob("*"))  # uploads are kept while the demo runs
    assert not [p for p in uploads.rglob("*") if p.is_file()], list(uploads.rglob("*"))


def test_max_sessions_below_one_fails_before_the_load(capsys):
    assert main(["web", "--max-sessions", "0"]) == 2
    assert capsys.readouterr().err == "cogvlm web: error: --max-sessions must be >= 1, not 0\n"


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium, installed on the spot where we are root. Elsewhere a missing browser
    skips the test with the command that installs it; under CI (CI set) it must run, so it fails."""
    if not CHROMIUM.exists() and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / "scripts" / "install-test-deps.sh")], check=True, timeout=600)
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} is missing and installing it needs root: sudo scripts/install-test-deps.sh"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the browser test: {why}")
        pytest.skip(why)
    return CHROMIUM


@contextmanager
def web_server(checkpoint: Path, log: Path, *flags: str) -> Iterator[str]:
    """`cogvlm web` on a free loopback port, greedy, one conversation kept; yields its URL."""
    pytest.importorskip("gradio", reason="pip install 'cogvlm[web]'")
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(log.parent / "gradio"))

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    with running(["web", "--model", str(checkpoint), "--port", str(port), "--top_k", "1",
                  "--max_new_tokens", "8", "--max-sessions", "1", *flags], log, listening, timeout=90, env=env):
        yield f"http://127.0.0.1:{port}"
    output = log.read_text()
    assert f"cogvlm web: running on http://127.0.0.1:{port}" in output
    assert "restart with --share" in output and "share=True" not in output


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[str]:
    with web_server(tiny_checkpoint, tmp_path_factory.mktemp("web") / "server.log") as url:
        yield url


def offline(server: str, outside: list[str]):
    """A Playwright route handler: the page's own server only; anything else is aborted and noted."""
    def route_to(route):
        url = route.request.url
        if url.startswith((server, "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()
    return route_to


@pytest.mark.slow
def test_chat_in_the_browser(chromium, server, tiny_checkpoint):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install 'cogvlm[test]'")
    vlm = CogVLM.from_pretrained(tiny_checkpoint)
    image = EXAMPLES / "shapes-4.png"
    session = vlm.session(image, **GREEDY)
    expected = [session.ask("Describe the image."), session.ask(BOX_QUERY)]
    count = next(e for e in load_examples(EXAMPLES) if e.label == "Count the objects")
    expected_example = vlm.session(count.image, count.template, **GREEDY).ask(count.prompt)
    outside: list[str] = []

    loopback_only = offline(server, outside)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", loopback_only)
            page.goto(server)
            bot = page.locator('#chat [data-testid="bot"]')
            query = page.locator("#query textarea")
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#image img").wait_for()
            for i, question in enumerate(["Describe the image.", BOX_QUERY]):
                query.fill(question)
                page.locator("#send").click()
                sync_api.expect(bot).to_have_count(i + 1, timeout=30_000)
                sync_api.expect(bot.nth(i)).to_have_text(expected[i], timeout=30_000)

            drawn_img = page.locator("#boxes img")
            drawn_img.wait_for(timeout=30_000)
            drawn = Image.open(io.BytesIO(page.request.get(drawn_img.get_attribute("src")).body()))
            w, h = drawn.size
            assert (w, h) == drawable(Image.open(image)).size  # small images are drawn enlarged
            assert drawn.convert("RGB").getpixel((round(0.1 * w), round(0.4 * h))) == PALETTE[0]

            page.get_by_role("button", name="Count the objects").click()  # another template: a new chat
            sync_api.expect(page.locator('#chat [data-testid="user"]')).to_have_text([count.prompt], timeout=30_000)
            sync_api.expect(bot).to_have_text([expected_example], timeout=30_000)

            other = browser.new_page()  # a second tab's conversation takes the one place
            other.route("**/*", loopback_only)
            other.goto(server)
            other.locator("#query textarea").fill("Describe the image.")
            other.locator("#send").click()
            sync_api.expect(other.locator('#chat [data-testid="bot"]')).to_have_count(1, timeout=30_000)
            query.fill(count.prompt)  # so the first tab's is gone: it is told, and starts over
            page.locator("#send").click()
            sync_api.expect(page.get_by_text(CLOSED)).to_be_visible(timeout=30_000)
            sync_api.expect(bot).to_have_text([expected_example], timeout=30_000)
            (ROOT / "test-artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "test-artifacts" / "web.png"), full_page=True)

            page.locator("#clear").click()
            sync_api.expect(bot).to_have_count(0, timeout=10_000)
        finally:
            browser.close()
    assert outside == [], "the page must work offline"


# ---- a video model (CogVLM2-Video): a video upload, video examples, the server's limits ---------------

@pytest.fixture(scope="module")
def video_web(video_checkpoint, tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("av")
    with web_server(video_checkpoint, tmp_path_factory.mktemp("web") / "server.log", "--template", "chat",
                    "--max-video-seconds", "10") as url:
        yield url


@pytest.mark.slow
def test_a_clip_in_the_browser(chromium, video_web, video_checkpoint, tmp_path):
    """Upload a clip and ask twice: the answers equal a `ChatSession` on the same file's frames; a
    clip over --max-video-seconds gets the limit's message, not an answer; a video example answers
    as the API does."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install 'cogvlm[test]'")
    from tests.test_video import cfr, make_clip

    vlm = CogVLM.from_pretrained(video_checkpoint)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(range(10), Fraction(1, 4), 4, first=5))
    session = vlm.session(None, "chat", video=clip, **GREEDY)
    expected = [session.ask("What happens?"), session.ask("And then?")]
    long = tmp_path / "long.mp4"
    long.write_bytes(cfr(14, 2)[0])
    example = next(e for e in load_examples(EXAMPLES) if e.label == "What changes?")
    expected_example = vlm.session(None, example.template, video=example.video, **GREEDY).ask(example.prompt)
    outside: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", offline(video_web, outside))
            page.goto(video_web)
            page.locator("#video input[type=file]").wait_for(state="attached", timeout=60_000)
            assert page.locator("#image").count() == 0  # a video model shows no image input
            bot = page.locator('#chat [data-testid="bot"]')
            query = page.locator("#query textarea")
            page.locator("#video input[type=file]").set_input_files(str(clip))
            page.locator("#video video").wait_for()
            for i, question in enumerate(["What happens?", "And then?"]):
                query.fill(question)
                page.locator("#send").click()
                sync_api.expect(bot).to_have_count(i + 1, timeout=30_000)
                sync_api.expect(bot.nth(i)).to_have_text(expected[i], timeout=30_000)

            page.get_by_role("button", name="What changes?").click()
            sync_api.expect(bot).to_have_text([expected_example], timeout=30_000)

            (ROOT / "test-artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "test-artifacts" / "web-video.png"), full_page=True)

            other = browser.new_page()  # a fresh tab: its upload is empty
            other.route("**/*", offline(video_web, outside))
            other.goto(video_web)
            other.locator("#video input[type=file]").set_input_files(str(long))
            other.locator("#video video").wait_for()
            other.locator("#query textarea").fill("What happens?")
            other.locator("#send").click()
            sync_api.expect(other.get_by_text("the clip lasts 14.0 s, over the limit of 10 s")).to_be_visible(
                timeout=30_000)
            sync_api.expect(other.locator('#chat [data-testid="bot"]')).to_have_count(0)
        finally:
            browser.close()
    assert outside == [], "the page must work offline"


def test_video_examples_are_shown_to_video_models_only(tmp_path, capsys):
    examples = load_examples(EXAMPLES)
    videos = [e for e in examples if e.video is not None]
    assert videos and all(e.image is None and e.video.suffix == ".mp4" for e in videos)
    assert all(e.template == "chat" for e in videos)  # the template the authors' demos use with clips
    (tmp_path / "examples.json").write_text('[{"image": "a.png", "video": "a.mp4", "prompt": "", '
                                            '"template": "base", "label": "x"}]')
    assert main(["web", "--examples", str(tmp_path)]) == 2
    assert "image or video" in capsys.readouterr().err
