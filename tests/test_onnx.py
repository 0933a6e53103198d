"""ONNX export: both towers match PyTorch (and the reference fixtures) under onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.cli.main import main
from conftest import OPENAI, OPENAI_FLAGS

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from clipforge.export.onnx import CONFIG_FILE, IMAGE_FILE, TEXT_FILE, OnnxCLIP, export_onnx  # noqa: E402


def check_against_fixture(onnx_dir, fixture) -> float:
    """Max |ONNX - expected| over batch sizes 1 and 3, int32 and int64 tokens; also the raw PNG path."""
    expected = load_file(str(fixture / "expected.safetensors"))
    runner = OnnxCLIP(onnx_dir)
    worst = 0.0
    for batch in (1, 3):
        got = runner.encode_image(expected["pixels"][:batch].numpy(), normalize=False)
        assert got.shape == (batch, expected["image_features"].shape[1])
        worst = max(worst, float(np.abs(got - expected["image_features"][:batch].numpy()).max()))
        for dtype in (torch.int32, torch.int64):
            got = runner.encode_text(expected["tokens"][:batch].to(dtype), normalize=False)
            worst = max(worst, float(np.abs(got - expected["text_features"][:batch].numpy()).max()))
    # The folder alone (tokenizer + preprocess config) reproduces clipforge's own pipeline.
    ckpt = fixture / "openai_state_dict.safetensors"
    model, preprocess = clipforge.load(ckpt, **OPENAI)
    images = [fixture / f"image{i}.png" for i in range(4)]
    want = model.encode_image(torch.stack([preprocess(p) for p in images]), normalize=True).detach().numpy()
    worst = max(worst, float(np.abs(runner.embed_images(images) - want).max()))
    captions = json.loads((fixture / "meta.json").read_text())["captions"][:3]
    tokens = clipforge.get_tokenizer(ckpt, context_length=model.context_length)(captions)
    want = model.encode_text(tokens, normalize=True).detach().numpy()
    worst = max(worst, float(np.abs(runner.embed_texts(captions) - want).max()))
    return worst


def test_cli_export_vit_matches_pytorch(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"), str(out), *OPENAI_FLAGS]) == 0
    assert "max abs diff" in capsys.readouterr().out
    for name in (IMAGE_FILE, TEXT_FILE, CONFIG_FILE, "bpe_vocab.txt.gz"):
        assert (out / name).is_file()
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["parity"]["max_abs_diff"] <= 1e-4
    assert set(config["parity"]["by_check"]) >= {"image_b1", "image_b3", "text_b1_int32", "text_b3_int64"}
    diff = check_against_fixture(out, fixtures_dir / "openai-vit-tiny")
    print(f"ViT ONNX max abs diff vs fixture: {diff:.3g}")
    assert diff <= 1e-4
    assert all((out / f).is_file() for f in config["external_data"].values()) and len(config["external_data"]) == 2
    # A client without clipforge: tokenizer.json (HF tokenizers) feeds the text graph directly.
    import onnxruntime as ort
    from tokenizers import Tokenizer

    captions = json.loads((fixtures_dir / "openai-vit-tiny" / "meta.json").read_text())["captions"]
    captions = [c for c in captions if "&amp;" not in c]  # HTML entities: the documented difference
    ids = np.array([e.ids for e in Tokenizer.from_file(str(out / config["tokenizer"]["file"])).encode_batch(captions)])
    session = ort.InferenceSession(str(out / TEXT_FILE), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"tokens": ids})[0]
    np.testing.assert_allclose(got, OnnxCLIP(out).embed_texts(captions), atol=1e-6)


def test_export_resnet_matches_pytorch(tmp_path, fixtures_dir):
    config = export_onnx(clipforge.load(fixtures_dir / "openai-rn-tiny" / "openai_state_dict.safetensors", **OPENAI)[0],
                         tmp_path)
    assert config["parity"]["max_abs_diff"] <= 1e-4
    diff = check_against_fixture(tmp_path, fixtures_dir / "openai-rn-tiny")
    print(f"ResNet ONNX max abs diff vs fixture: {diff:.3g}")
    assert diff <= 1e-4


def test_export_errors(tmp_path, capsys):
    assert main(["export", "onnx", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="onnx_config.json"):
        OnnxCLIP(tmp_path)
    with pytest.raises(ValueError, match="integer"):
        from clipforge.export.onnx import as_token_array

        as_token_array(np.zeros((2, 5), dtype=np.float32))


def test_export_without_the_extra_names_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main(["export", "onnx", "cpu-vit-tiny-32", str(tmp_path / "out"), "--random-weights"]) == 2
    assert "needs onnxscript: pip install 'clipforge[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
