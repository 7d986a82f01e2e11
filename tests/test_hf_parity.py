"""What a side-by-side run against the authors' Hugging Face code found (issue 28): how linear
layers receive their inputs, the text-only prompt, special-token strings in user text, and
how an answer is cleaned up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvlm import CogVLM
from tests.configs import tiny_test_config
from cogvlm.data.records import Record
from cogvlm.finetune import make_examples
from cogvlm.generate import TextStream, final_text
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, build_prompt, layout_batch
from cogvlm.quantize import PackedLinear, can_prepack, prepack_model
from cogvlm.tokenizer import Tokenizer

from .conftest import randomize

# ---- 1. every linear layer gets a matrix it can multiply without bmm ----------------------


def dense_rows(x: torch.Tensor) -> bool:
    """torch folds a (..., D) input into one matmul only when its leading dimensions are laid out
    densely, stride by stride (aten's `should_fold`); otherwise, with a weight that takes no
    gradient, it runs bmm plus a copy. Size-1 dimensions count too: `x[:, a:b]` of a batch-1
    activation is "contiguous" for torch, yet not dense here."""
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cogagent", [False, True])
def test_every_linear_layer_gets_dense_rows(packed, batch, cogagent):
    if packed and not can_prepack(torch.device("cpu"), torch.float32):
        pytest.skip("this torch build has no oneDNN")
    cfg = tiny_test_config(vocab_size=400, **({"template": "inst", "cross_vision": {}} if cogagent else {}))
    model = randomize(CogVLMForCausalLM(cfg)).eval().requires_grad_(False)  # as loaded for inference
    if packed:
        model = prepack_model(model)
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, PackedLinear)):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
    g = torch.Generator().manual_seed(0)
    high = torch.randn(3, 56, 56, generator=g) if cogagent else None  # CogAgent's high-resolution picture
    prompts = [PromptTokens(torch.randn(3, 28, 28, generator=g), [5, 6, 7, 8], high)] * batch
    with torch.no_grad():
        model(layout_batch(prompts, model.config), last_only=True)
    assert any("vision_expert" in n for n in seen) and "model.vision.linear_proj.linear_proj" in seen
    assert not cogagent or (any("cross_vision" in n for n in seen) and any(n.endswith("key_value") for n in seen))
    bad = sorted({n for n, inputs in seen.items() for x in inputs if not dense_rows(x)})
    assert not bad, f"strided inputs (bmm path) in {bad}"


# ---- 2. a conversation without an image is framed as the authors' demo frames it ---------

# basic_demo/cli_demo_hf.py of the authors' repository, word for word
AUTHORS_TEXT_ONLY = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                     "helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")


def authors_text_only_prompts(queries: list[str], answers: list[str]) -> list[str]:
    """The prompt of each turn as the authors' demo builds it (they then pass it with the base
    template, which sends it verbatim). Their history holds each turn's whole prompt, so from the
    third turn on their demo repeats earlier turns; the first two turns are exact."""
    history, prompts = [], []
    for i, query in enumerate(queries):
        if i == 0:
            query = AUTHORS_TEXT_ONLY.format(query)
        else:
            old_prompt = "".join(old_query + " " + response + "\n" for old_query, response in history)
            query = old_prompt + "USER: {} ASSISTANT:".format(query)
        prompts.append(query)
        history.append((query, answers[i]))
    return prompts


@pytest.mark.parametrize("template", ["chat", "vqa"])
def test_text_only_prompt_is_the_authors_vicuna_frame(template):
    first, second = authors_text_only_prompts(["What is 2+2?", "And 3+3?"], ["4", ""])
    assert build_prompt("What is 2+2?", (), template, image=False) == first
    assert build_prompt("And 3+3?", [("What is 2+2?", "4")], template, image=False) == second
    # with an image nothing changes
    assert build_prompt("What is 2+2?", (), template) == build_prompt("What is 2+2?", (), template, image=True)
    assert build_prompt("What is 2+2?", (), template).startswith("Question: ")


def test_base_template_sends_the_text_verbatim_without_an_image():
    assert build_prompt("Once upon a time", [("a", "b")], "base", image=False) == "Once upon a time"


def test_text_only_chat_sends_the_vicuna_frame(tiny_model, sp_model_path):
    tok = Tokenizer(sp_model_path)
    vlm = CogVLM(tiny_model, tok)
    prefills = []
    vlm.model.register_forward_hook(lambda m, args, out: prefills.append(args[0].input_ids[0].tolist()))
    session = vlm.session(None, max_new_tokens=3, top_k=1)
    first = session.ask("Hi!")
    session.ask("And then?")
    want = authors_text_only_prompts(["Hi!", "And then?"], [first, ""])
    assert prefills[0] == [1] + tok.encode(want[0])
    # the second turn prefills only what follows the cached tokens, and the whole prompt is the demo's
    assert vlm.prompt_tokens(None, "And then?", session.history[:1]).text_ids == tok.encode(want[1])
    assert prefills[1] == tok.encode(want[1])[-len(prefills[1]):]
    # the one-call API sends the same
    assert vlm.prompt_tokens(None, "Hi!").text_ids == tok.encode(want[0])


def test_fine_tuning_trains_text_only_records_on_the_prompt_chat_sends(tiny_model, sp_model_path):
    tok = Tokenizer(sp_model_path)
    rec = Record(None, "chat", [("Hi!", "Hello."), ("Bye?", "Bye.")], line=1)
    examples, errors = make_examples([rec], tok, tiny_model.config, max_length=256)
    assert not errors
    assert examples[1].prompt_ids == tok.encode(build_prompt("Bye?", [("Hi!", "Hello.")], "chat", image=False))
    assert examples[1].prompt_ids == CogVLM(tiny_model, tok).prompt_tokens(None, "Bye?", [("Hi!", "Hello.")]).text_ids


# ---- 3. special-token strings in user text stay text -------------------------------------


def test_special_token_strings_in_a_query_are_plain_text(tiny_model, sp_model_path):
    """The authors' LlamaTokenizer turns a typed `</s>` or `<unk>` into the special ids; we keep
    them text, so a user cannot end the model's turn (or inject <s>) by typing them."""
    tok = Tokenizer(sp_model_path)
    query = "Is </s> the end? <unk> <s> no"
    ids = CogVLM(tiny_model, tok).prompt_tokens(torch.zeros(28, 28, 3).byte().numpy(), query).text_ids
    assert not {0, 1, 2} & set(ids)  # no <unk>, <s> or </s> id
    assert tok.decode(ids) == build_prompt(query)  # and the text comes back as typed


# ---- 4. the answer loses surrounding white space, nothing else ----------------------------

EDGES = ["\x1cGS\x1d \x1e", "\x1f x \x1f", " \t\nanswer\n ", "\x85a\xa0", "\u3000b\u2028"]


@pytest.mark.parametrize("text", EDGES)
def test_answer_strips_ascii_white_space_only(sp_model_path, text):
    tok = Tokenizer(sp_model_path)
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte fallback: the test text itself survives
    want = text.strip(" \t\n\r\v\f")
    assert final_text(tok, ids) == want
    stream = TextStream(tok)
    assert "".join([stream.push(t) for t in ids] + [stream.finish()]) == want
