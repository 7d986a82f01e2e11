from __future__ import annotations

import pytest

from cogvlm.tokenizer import Tokenizer, TokenizerError


def test_llama_like_tokenizer(sp_model_path):
    tok = Tokenizer(sp_model_path)
    assert (tok.bos_id, tok.eos_id, tok.id_to_piece(0)) == (1, 2, "<unk>")
    ids = tok.encode("Question: How many objects are there? Answer:")
    assert tok.id_to_piece(ids[0]).startswith("▁")  # sentencepiece's dummy prefix
    assert 1 not in ids and 2 not in ids  # add_special_tokens=False
    assert tok.decode(ids) == "Question: How many objects are there? Answer:"
    assert tok.encode("") == []
    # byte fallback: a character never seen in training survives a round trip as bytes
    ids = tok.encode("fox 🦊")
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == "fox 🦊"
    # digits are split one by one, as LLaMA's tokenizer does
    assert [tok.id_to_piece(i) for i in tok.encode("x 123")][-3:] == ["1", "2", "3"]


def test_tokenizer_found_in_folder_and_errors(sp_model_path, tmp_path):
    assert Tokenizer(sp_model_path.parent).path == sp_model_path
    with pytest.raises(TokenizerError, match="--tokenizer"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(tmp_path)
