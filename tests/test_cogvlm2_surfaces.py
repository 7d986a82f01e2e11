"""A tiny random CogVLM2 on every surface: the API, `cogvlm chat` (one-shot, --chinese), loading
by registry name and hub id from the Hugging Face cache, `cogvlm convert` of an int4 copy,
evaluation, `cogvlm serve`, tensor parallelism over two processes, and fine-tuning (full and
LoRA) from a random CogVLM2 config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from cogvlm import CogVLM
from cogvlm.checkpoint import load_model
from cogvlm.cli import main
from cogvlm.data.synthetic import make_dataset
from cogvlm.finetune import TrainArgs, Trainer
from cogvlm.prompt import PromptTokens, layout_batch

from .conftest import tiny_cogvlm2_config
from .test_caption import ENV, ROOT
from .test_cogvlm2 import on_fp4_grid, write_bnb_fp4
from .test_server import serving
from .test_tp import assert_same_logits, mixed_batch

EXAMPLE = ROOT / "cogvlm" / "web_examples" / "shapes-4.png"
GREEDY = {"top_k": 1, "max_new_tokens": 8}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", "8"]
CHINESE = "图片里有什么？"


@pytest.fixture(scope="module")
def vlm(cogvlm2_checkpoint: Path) -> CogVLM:
    return CogVLM.from_pretrained(cogvlm2_checkpoint, device="cpu")


def test_api_chat_session_and_batch(vlm):
    assert type(vlm.tokenizer).__name__ == "BPETokenizer"
    assert vlm.defaults.max_length == vlm.config.max_position_embeddings  # CogVLM2: its 8K context
    # text-only keeps the chat template (no Vicuna frame: the decoder is Llama-3's)
    assert vlm.prompt_tokens(None, CHINESE).text_ids == vlm.tokenizer.encode(f"Question: {CHINESE} Answer:")
    answer, history = vlm.chat(EXAMPLE, "What is in the image?", **GREEDY)
    assert answer and history == [("What is in the image?", answer)]
    session = vlm.session(EXAMPLE, **GREEDY)
    assert session.ask("What is in the image?") == answer
    second = session.ask(CHINESE)
    assert second == vlm.chat(EXAMPLE, CHINESE, history, **GREEDY)[0]  # the cached turn equals a fresh call
    batch = vlm.generate([(EXAMPLE, "What is in the image?", None), (None, CHINESE, None)], **GREEDY)
    assert batch == [answer, vlm.chat(None, CHINESE, **GREEDY)[0]]
    assert vlm.caption(EXAMPLE, **GREEDY) == vlm.chat(EXAMPLE, "", template="base", **GREEDY)[0]


def test_chat_one_shot_in_chinese(vlm, cogvlm2_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(cogvlm2_checkpoint), "--chinese", "--image", str(EXAMPLE),
                 "--query", CHINESE, *GREEDY_FLAGS]) == 0
    assert capsys.readouterr().out == vlm.chat(EXAMPLE, CHINESE, **GREEDY)[0] + "\n"


def fake_hub_cache(hf_home: Path, repo: str, files: Path) -> None:
    """`files` as the cached snapshot of `repo` in the Hugging Face cache layout."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c0")
    shutil.copytree(files, root / "snapshots" / "c0")


def int4_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as the published int4 repos ship theirs: one pytorch_model.bin with the
    decoder's linear weights in bitsandbytes fp4 (on the fp4 grid, so the copy is exact)."""
    model, _ = load_model(checkpoint)
    state = {k: on_fp4_grid(v.shape, torch.bfloat16, seed=i) if v.ndim == 2 and k.startswith("model.layers.")
             else v.to(torch.bfloat16) for i, (k, v) in enumerate(model.state_dict().items())}
    write_bnb_fp4(out, state, json.loads((checkpoint / "config.json").read_text()), packed=("model.layers.",))
    shutil.copy(checkpoint / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.mark.slow  # a subprocess with its own Hugging Face cache
def test_loaded_by_registry_name_and_hub_id_from_the_cache(vlm, cogvlm2_checkpoint, tmp_path):
    fake_hub_cache(tmp_path, "THUDM/cogvlm2-llama3-chat-19B", cogvlm2_checkpoint)
    fake_hub_cache(tmp_path, "THUDM/cogvlm2-llama3-chinese-chat-19B-int4",
                   int4_copy(cogvlm2_checkpoint, tmp_path / "int4"))
    script = ("from cogvlm import CogVLM\n"
              "for name in ('cogvlm2-llama3-chat-19B', 'THUDM/cogvlm2-llama3-chat-19B',"
              " 'cogvlm2-llama3-chinese-chat-19B-int4'):\n"
              f"    print(CogVLM.from_pretrained(name, device='cpu').chat(None, {CHINESE!r}, top_k=1,"
              " max_new_tokens=8)[0])\n")
    env = {**ENV, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    want = vlm.chat(None, CHINESE, **GREEDY)[0]
    by_name, by_id, int4 = out.stdout.splitlines()
    assert by_name == by_id == want
    assert int4 == CogVLM.from_pretrained(tmp_path / "int4", device="cpu").chat(None, CHINESE, **GREEDY)[0]


def test_convert_unpacks_an_int4_copy_into_safetensors(cogvlm2_checkpoint, tmp_path):
    src = int4_copy(cogvlm2_checkpoint, tmp_path / "int4")
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not list((tmp_path / "hf").glob("*.bin"))
    converted, _ = load_model(tmp_path / "hf")
    original, _ = load_model(src)
    got, want = converted.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_evaluate_scores_cogvlm2_answers(vlm, tmp_path):
    from cogvlm.data.records import read_records
    from cogvlm.eval.jsonl import evaluate

    data = make_dataset(tmp_path / "eval", n_images=2, seed=4, image_size=48)
    short = CogVLM(vlm.model, vlm.tokenizer, defaults=vlm.sampling(max_new_tokens=8))
    result = evaluate(short, data, batch_size=4, progress=False)
    records = read_records(data)[0]
    assert len(result["examples"]) == sum(len(r.turns) for r in records) > 0
    by_line = {r.line: r for r in records}
    for ex in result["examples"][:3]:
        rec = by_line[ex["line"]]
        turn = [q for q, _ in rec.turns].index(ex["query"])
        assert ex["prediction"] == vlm.chat(rec.image, ex["query"], rec.turns[:turn], rec.template, **GREEDY)[0]


@pytest.mark.slow  # a server subprocess
def test_served_under_its_model_name(vlm, cogvlm2_checkpoint, tmp_path):
    name = "cogvlm2-llama3-chinese-chat-19B"
    with serving(cogvlm2_checkpoint, tmp_path / "log", "--served-model-name", name) as url:
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [name]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": name, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": CHINESE}]}).json()
    assert reply["choices"][0]["message"]["content"] == vlm.chat(None, CHINESE, **GREEDY)[0]


@pytest.mark.slow  # a second process
def test_tensor_parallel_logits_and_greedy_tokens_equal_one_process(vlm, cogvlm2_checkpoint):
    """CogVLM2's grouped-query attention (4 query heads on 2 KV heads, a vision QKV bias) on two
    processes: each rank runs 2 query heads on its 1 KV head; logits with an image and
    text-only within 1e-5 of one process, greedy tokens equal."""
    two = CogVLM.from_pretrained(cogvlm2_checkpoint, device="cpu", tp=2)
    try:
        attn = two.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert_same_logits(vlm.model, two.model, mixed_batch(vlm.config))
        assert_same_logits(vlm.model, two.model, layout_batch([PromptTokens(None, [9, 10, 11])], vlm.config))

        def greedy(model: CogVLM) -> list[list[int]]:
            prompts = [model.prompt_tokens(EXAMPLE, "What is in the image?"), model.prompt_tokens(None, CHINESE)]
            decoder = model.decoder(prompts, [model.sampling(**GREEDY)] * 2)
            while not decoder.done:
                decoder.step()
            return decoder.generated

        want = greedy(vlm)
        assert all(want) and greedy(two) == want
    finally:
        two.close()


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_a_random_cogvlm2(bpe_tokenizer_path, tmp_path, lora):
    data = make_dataset(tmp_path / "data", n_images=12, seed=1, image_size=56)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_cogvlm2_config(bpe_tokenizer_path, template="vqa").to_hf_dict()))
    run = tmp_path / "run"
    a = TrainArgs(data=data, out=run, init_config=config,
                  tokenizer=bpe_tokenizer_path, train="all", steps=5, batch_size=4, lr=3e-3, warmup=1,
                  progress=False, lora=lora, lora_r=4)
    trainer = Trainer(a)
    assert trainer.examples and not trainer.errors
    assert all(ex.answer_ids[-1] == trainer.cfg.eos_token_id for ex in trainer.examples)  # <|end_of_text|>
    trainer.fit()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    final = run / "final"
    assert (final / "tokenizer.json").is_file()
    if lora:
        assert (final / "adapter_config.json").is_file()
        return
    saved, _ = load_model(final)
    assert saved.config.num_key_value_heads == 2 and saved.config.stop_token_ids
    inner = trainer.inner.state_dict()
    assert all(torch.equal(v, inner[k]) for k, v in saved.state_dict().items())
    answer = CogVLM.from_pretrained(final, device="cpu").chat(EXAMPLE, "What is in the image?", **GREEDY)[0]
    assert isinstance(answer, str)
