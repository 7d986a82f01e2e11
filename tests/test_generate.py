"""The generation engine: cache vs recomputation, batch vs single, streaming, sessions, errors."""

from __future__ import annotations

import pytest
import torch

from cogvlm import CogVLM, ContextLengthError, ImageError
from cogvlm.generate import SamplingParams, TextStream, final_text
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.tokenizer import Tokenizer

GREEDY = dict(top_k=1)


@pytest.fixture
def vlm(tiny_model, sp_model_path):
    with torch.no_grad():
        tiny_model.lm_head.weight[tiny_model.config.eos_token_id] = 0  # keep answers long for the tests
    return CogVLM(tiny_model, Tokenizer(sp_model_path))


def image(seed):
    return (torch.rand(32, 40, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy()


def full_logits(vlm, prompt: PromptTokens, generated: list[int]) -> torch.Tensor:
    """Next-token logits with no cache: the whole sequence from scratch."""
    chunk = layout_batch([PromptTokens(prompt.pixels, prompt.text_ids + generated)], vlm.config)
    with torch.no_grad():
        return vlm.model(chunk, last_only=True)[0]


@pytest.mark.parametrize("with_image", [True, False])
def test_cached_decoding_equals_recomputation(vlm, with_image):
    prompt = vlm.prompt_tokens(image(0) if with_image else None, "What is in the image?")
    decoder = vlm.decoder([prompt], [vlm.sampling(max_new_tokens=16, **GREEDY)])
    steps = 0
    while not decoder.done:
        used = decoder.logits[0].clone() if decoder._last is None else None
        out = decoder.step()
        if used is None:
            used = decoder.logits[0]
        if not out:
            break
        want = full_logits(vlm, prompt, decoder.generated[0][:-1])
        assert (used - want).abs().max().item() <= 1e-4
        assert used.argmax().item() == decoder.generated[0][-1]
        steps += 1
    assert steps == 16


def test_chat_session_reuses_cache_and_matches_recomputation(vlm, monkeypatch):
    calls = []  # (chunk, logits) of the prefill, then (None, logits) of each decode step
    hook = vlm.model.register_forward_hook(lambda m, args, out: calls.append((args[0], out[0].clone())))
    decode_step = vlm.model.decode_step

    def recording_decode_step(*args):
        logits = decode_step(*args)
        calls.append((None, logits[0].clone()))
        return logits

    monkeypatch.setattr(vlm.model, "decode_step", recording_decode_step)
    img = image(1)
    session = vlm.session(img, max_new_tokens=16, **GREEDY)
    for query in ("What is in the image?", "How many objects are there?", "Where is the red circle?"):
        history = list(session.history)
        calls.clear()
        answer = session.ask(query)
        recorded = list(calls)  # full_logits below runs the model too
        prompt = vlm.prompt_tokens(img, query, history)
        generated = session._tokens[1 + vlm.config.image_tokens + len(prompt.text_ids):]
        prefill_tokens = recorded[0][0].input_ids.shape[1]
        if history:  # only the new turn's tokens are prefilled, no image, no old history
            assert recorded[0][0].images is None
            assert prefill_tokens < len(prompt.text_ids)
        for k, (_, logits) in enumerate(recorded):
            want = full_logits(vlm, prompt, generated[:k])
            assert (logits - want).abs().max().item() <= 1e-4, (len(history), k)
        # and the answer equals a fresh, stateless chat call with the same history
        assert answer == vlm.chat(img, query, history, max_new_tokens=16, **GREEDY)[0]
        assert len(recorded) == 16
    hook.remove()


@torch.no_grad()
def test_compiled_decode_step_matches_eager(vlm, fresh_dynamo):
    """torch.compile'd decode (compile=True) gives the eager logits, for a padded batch mixing an
    image and a text-only row and for a single row, across a growth of the attention window.
    The batch is compiled with frozen, packed weights; batch 1 keeps the plain ones."""
    from torch._dynamo.utils import counters

    from cogvlm.model import DECODE_WINDOW

    steps = DECODE_WINDOW + 8

    def decode(*prompts: PromptTokens) -> torch.Tensor:
        chunk = layout_batch(list(prompts), vlm.config)
        cache = vlm.model.new_cache(len(prompts), chunk.input_ids.shape[1] + steps)
        logits, positions, out = vlm.model(chunk, cache, last_only=True), chunk.position_ids[:, -1] + 1, []
        for _ in range(steps):
            logits = vlm.model.decode_step(logits.argmax(-1), positions, cache)
            positions = positions + 1
            out.append(logits)
        return torch.stack(out)

    pair = vlm.prompt_tokens(image(0), "What is in the image?"), vlm.prompt_tokens(None, "Hi")
    single = vlm.prompt_tokens(None, "Hello there")
    eager_pair, eager_single = decode(*pair), decode(single)
    vlm.model.compile_decode()
    graphs = counters["stats"]["unique_graphs"]
    packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    compiled_pair = decode(*pair)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled step did run
    if torch.backends.mkldnn.is_available():  # and with frozen weights, packed by inductor
        assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > packed
    graphs = counters["stats"]["unique_graphs"]
    packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    compiled_single = decode(single)
    assert counters["stats"]["unique_graphs"] > graphs
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == packed
    assert (compiled_pair - eager_pair).abs().max().item() <= 1e-4
    assert (compiled_single - eager_single).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="compile=True packs the weights itself"):
        CogVLM.from_pretrained("not-loaded", compile=True, prepack=True)


@torch.no_grad()
def test_a_later_compiled_model_is_compiled_too(tiny_config, fresh_dynamo):
    """Every model's decode step is one method's code, whose graphs dynamo keeps for the whole
    process and runs eagerly past `recompile_limit`: compile_decode makes room for each model.
    bf16: its graphs hold the model's frozen weights, so each model compiles graphs of its own
    (an fp32 batch-1 graph takes the weights as inputs and serves every model)."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    from cogvlm.model import CogVLMForCausalLM

    from .conftest import randomize

    chunk = layout_batch([PromptTokens(None, [5, 6, 7])], tiny_config)
    with dynamo_config.patch(recompile_limit=1):  # as if earlier models had used it up (restored after;
        for seed in (1, 2):                       # pytest's monkeypatch cannot undo a torch config)
            model = randomize(CogVLMForCausalLM(tiny_config), seed=seed).to(torch.bfloat16).eval()
            model.compile_decode()
            cache = model.new_cache(1, 8)
            logits = model(chunk, cache, last_only=True)
            graphs = counters["stats"]["unique_graphs"]
            model.decode_step(logits.argmax(-1), chunk.position_ids[:, -1] + 1, cache)
            assert counters["stats"]["unique_graphs"] > graphs, f"model {seed} ran its decode step eagerly"


def test_session_encodes_image_once_for_three_turns(vlm):
    count = []
    vlm.model.model.vision.register_forward_hook(lambda *a: count.append(1))
    session = vlm.session(image(2), max_new_tokens=4)
    for q in ("one?", "two?", "three?"):
        session.ask(q)
    assert len(count) == 1 and len(session.history) == 3
    session.clear()
    session.ask("again?")
    assert len(count) == 1 and len(session.history) == 1


def test_session_after_clear_ignores_the_old_turns_slots(vlm):
    """After `clear()` a short turn reuses cache slots the long earlier turns had filled; the
    answer must equal a fresh chat's (nothing of the old turns may leak into attention)."""
    img = image(5)
    session = vlm.session(img, max_new_tokens=16, **GREEDY)
    for q in ("What is in the image? Describe every object you see in detail.", "And what else?"):
        session.ask(q)
    session.clear()
    assert session.ask("Hi") == vlm.chat(img, "Hi", max_new_tokens=16, **GREEDY)[0]


def test_batch_equals_single(vlm):
    requests = [
        (image(3), "What is in the image?", None),
        (None, "Tell me a story about a cat", None),
        (image(4), "How many?", [("What is in the image?", "a red circle")]),
        (image(3), "Where is the green triangle? answer in [[x0,y0,x1,y1]] format.", None),
    ]
    batch = vlm.generate(requests, max_new_tokens=12, **GREEDY)
    singles = [vlm.chat(img, q, h, max_new_tokens=12, **GREEDY)[0] for img, q, h in requests]
    assert batch == singles
    assert len(set(batch)) > 1  # the rows really differ

    prompts = [vlm.prompt_tokens(*r) for r in requests]
    params = [vlm.sampling(max_new_tokens=12, **GREEDY)]
    batched = vlm.decoder(prompts, params * 4)
    list(batched.run())
    for row, p in enumerate(prompts):
        alone = vlm.decoder([p], params)
        list(alone.run())
        assert batched.generated[row] == alone.generated[0]


def test_finished_rows_leave_the_batch(vlm):
    prompts = [vlm.prompt_tokens(None, "a"), vlm.prompt_tokens(None, "b c d")]
    budgets = [2, 6]
    decoder = vlm.decoder(prompts, [vlm.sampling(max_new_tokens=b) for b in budgets])
    sizes = []
    while not decoder.done:
        decoder.step()
        sizes.append(decoder.cache.batch_size)
    assert [len(g) for g in decoder.generated] == budgets
    assert sizes[0] == 2 and sizes[-1] == 1


def test_stream_equals_non_stream(vlm):
    img = image(5)
    for seed in range(3):
        kw = dict(max_new_tokens=24, top_k=0, top_p=0.95, temperature=1.5, seed=seed)
        pieces = list(vlm.stream(img, "Describe the image.", **kw))
        answer, _ = vlm.chat(img, "Describe the image.", **kw)
        assert "".join(pieces) == answer and len(pieces) > 1


TEXTS = ["Café naïve — 北京 上海 😀 and 🦊 fox", "  leading and trailing  ", "Answer: red\nQuestion: x",
         "ü", "🦊🦊🦊", "x 123 yes"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [(), ("Question:",), ("x",), ("🦊",)])
def test_text_stream_pieces_join_to_answer(sp_model_path, text, stop):
    tok = Tokenizer(sp_model_path)
    ids = tok.encode(text)
    stream = TextStream(tok, stop)
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == final_text(tok, ids, stop)
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_on_random_byte_pieces(sp_model_path):
    tok = Tokenizer(sp_model_path)
    g = torch.Generator().manual_seed(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    for _ in range(50):
        ids = [byte_ids[i] if i < len(byte_ids) else i for i in torch.randint(3, 400, (20,), generator=g).tolist()]
        stream = TextStream(tok, ("an",))
        pieces = [stream.push(t) for t in ids] + [stream.finish()]
        assert "".join(pieces) == final_text(tok, ids, ("an",))


def test_sampling_is_seeded_and_varied(vlm):
    kw = dict(top_k=0, top_p=1.0, temperature=2.0, max_new_tokens=10)
    a = vlm.generate([(None, "hello", None)] * 2, seed=7, **kw)
    b = vlm.generate([(None, "hello", None)], seed=7, **kw)
    assert a[0] == a[1] == b[0]
    others = {vlm.generate([(None, "hello", None)], seed=s, **kw)[0] for s in range(5)}
    assert len(others) > 1


def test_stop_strings_and_budget(vlm):
    free = vlm.chat(None, "hello", max_new_tokens=20, **GREEDY)[0]
    assert len(free) > 4
    stop = free[2:4]
    cut = vlm.chat(None, "hello", max_new_tokens=20, stop=[stop], **GREEDY)[0]
    assert cut == free[:free.index(stop)].strip()


def test_errors(vlm, tmp_path):
    with pytest.raises(ContextLengthError, match=r"takes \d+ tokens .* max_length is 20"):
        vlm.chat(image(0), "What is in the image? " * 3, max_length=20)
    for name, value in [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
                        ("max_new_tokens", 0), ("repetition_penalty", 0)]:
        with pytest.raises(ValueError, match=f"invalid {name}="):
            vlm.chat(None, "hi", **{name: value})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        vlm.chat(None, "hi", temprature=0.5)
    with pytest.raises(ImageError, match="image file not found"):
        vlm.chat(tmp_path / "nope.png", "hi")
    with pytest.raises(ContextLengthError):
        s = vlm.session(None, max_length=12)
        s.ask("a b c d e f g h i j k l m n o p")
    positions = vlm.config.max_position_embeddings
    assert vlm.defaults.max_length == positions  # the whole context: the authors' 2048 for v1, 8192 for CogVLM2
    with pytest.raises(ValueError, match=f"invalid max_length={positions + 1}: this model has {positions} positions"):
        vlm.chat(None, "hi", max_length=positions + 1)


def test_repetition_penalty_changes_greedy_output(vlm):
    plain = vlm.chat(None, "hello", max_new_tokens=30, **GREEDY)[0]
    penalized = vlm.chat(None, "hello", max_new_tokens=30, repetition_penalty=5.0, **GREEDY)[0]
    assert plain != penalized


def test_default_sampling_is_the_authors():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.max_length, p.greedy) == (0.8, 1, 0.4, 2048, True)


def test_rows_joining_a_running_batch_decode_as_if_alone(vlm):
    params = vlm.sampling(max_new_tokens=10, **GREEDY)
    first = [vlm.prompt_tokens(image(6), "What is in the image?")]
    later = [vlm.prompt_tokens(None, "Tell me a long story about three cats"),
             vlm.prompt_tokens(image(7), "How many?", [("What?", "a red circle")])]
    running = vlm.decoder(first, [params])
    for _ in range(3):
        running.step()
    ids = running.join(vlm.decoder(later, [params, vlm.sampling(max_new_tokens=4, **GREEDY)]))
    assert ids == [1, 2]
    sizes = []
    while not running.done:
        running.step()
        sizes.append(running.cache.batch_size)
    assert 3 in sizes  # the newcomers really decoded in the same batch
    for row, prompt in enumerate(first + later):
        alone = vlm.decoder([prompt], [params if row < 2 else vlm.sampling(max_new_tokens=4, **GREEDY)])
        list(alone.run())
        assert running.generated[row] == alone.generated[0], row


def test_scheduler_batches_concurrent_requests_and_cancels(vlm):
    import threading

    from cogvlm.scheduler import Scheduler

    sched = Scheduler(vlm, max_batch=8)
    try:
        params = vlm.sampling(max_new_tokens=12, **GREEDY)
        requests = [(image(i) if i % 2 else None, f"question number {i}?") for i in range(6)]
        jobs = [sched.submit(vlm.prompt_tokens(img, q), params) for img, q in requests]
        slow = sched.submit(vlm.prompt_tokens(None, "cancel me"), vlm.sampling(max_new_tokens=200, max_length=250))
        slow.cancel()
        answers = [j.result(timeout=60) for j in jobs]
        want = [vlm.chat(img, q, max_new_tokens=12, **GREEDY)[0] for img, q in requests]
        assert answers == want
        assert all(j.finish_reason in ("stop", "length") and j.completion_tokens > 0 for j in jobs)
        assert sched.max_batch_seen > 1
        slow.result(timeout=60)
        assert slow.finish_reason == "cancelled" or slow.completion_tokens < 500
        streamed = sched.submit(vlm.prompt_tokens(None, "stream please"), params)
        assert "".join(streamed.pieces(timeout=60)) == streamed.answer
        with pytest.raises(ContextLengthError):
            sched.submit(vlm.prompt_tokens(None, "x " * 50), vlm.sampling(max_length=20))
    finally:
        sched.close()
    assert not any(t.name == "cogvlm-scheduler" for t in threading.enumerate())
