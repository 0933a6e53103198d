"""ONNX export: both towers match PyTorch on fresh inputs and the reference fixtures under onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime  # noqa: F401  the onnx extra, which the test extra includes: missing, it fails here, loudly
import onnxscript  # noqa: F401  (torch's exporter imports it)
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.cli.main import main
from clipforge.export.onnx import CONFIG_FILE, IMAGE_FILE, TEXT_FILE, OnnxCLIP, export_onnx
from conftest import OPENAI, OPENAI_FLAGS, perturb_, random_tokens


def check_against_reference(onnx_dir, reference) -> float:
    """Max |ONNX - recorded| over batch sizes 1 and 3, int32 and int64 tokens; also the raw PNG path."""
    expected = reference.expected()
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
    model, preprocess = clipforge.load(reference.checkpoint, **OPENAI)
    want = model.encode_image(torch.stack([preprocess(p) for p in reference.images]), normalize=True).detach().numpy()
    worst = max(worst, float(np.abs(runner.embed_images(reference.images) - want).max()))
    captions = reference.captions[:3]
    tokens = clipforge.get_tokenizer(reference.checkpoint, context_length=model.context_length)(captions)
    want = model.encode_text(tokens, normalize=True).detach().numpy()
    worst = max(worst, float(np.abs(runner.embed_texts(captions) - want).max()))
    return worst


def check_fresh_inputs(onnx_dir, model) -> None:
    """The graphs under a plain onnxruntime session against the PyTorch model, on inputs export never checked.

    export_onnx's own check (batches 1 and 3, seed 0, full-length token rows) raises when it fails, so its
    recorded result cannot show anything; this one uses another batch size, wider pixel values, a shorter
    token sequence (the dynamic length), empty and context-filling captions, and both outputs of each graph.
    """
    import onnxruntime as ort

    config = json.loads((onnx_dir / CONFIG_FILE).read_text())
    image = ort.InferenceSession(str(onnx_dir / config["image_encoder"]), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(onnx_dir / config["text_encoder"]), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1234)
    size, context = model.image_size, model.context_length
    pixels = 2.5 * torch.randn(5, 3, size, size, generator=gen)
    token_sets = [random_tokens(4, context, [0, 1, 9, context - 2], seed=5),  # EOT right after SOT ... last slot
                  random_tokens(3, 20, [18, 2, 7], seed=6)]  # a 20-token input: the graph's dynamic length
    with torch.no_grad():
        features, embeddings = image.run(["features", "embeddings"], {"pixels": pixels.numpy()})
        want = model.encode_image(pixels)
        np.testing.assert_allclose(features, want.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(embeddings, F.normalize(want, dim=-1).numpy(), atol=1e-5, rtol=0)
        for tokens in token_sets:
            features, embeddings = text.run(["features", "embeddings"], {"tokens": tokens.numpy()})
            want = model.encode_text(tokens)  # clipforge's trimming path
            np.testing.assert_allclose(features, want.numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(embeddings, F.normalize(want, dim=-1).numpy(), atol=1e-5, rtol=0)


# Clean text (no HTML entities, mojibake, fullwidth forms or ligatures: tokenizer.json's documented limits)
# that still exercises case, contractions, digits, punctuation runs, scripts, emoji, whitespace and truncation.
TRICKY_TEXTS = ["", "   ", "A Rocket launching into SPACE!!", "don't stop, it's 42 degrees; isn't it?!?",
                "numbers 3.14159 and 2,718", "CLIP = Contrastive Language-Image Pre-training", "line\nbreak\ttab  two",
                "東京タワーの夜景", "Привет, мир", "👩🏿‍🚀 astronaut 🐱🐶", "naïve café résumé", "<|endoftext|> marks",
                "#tag @user ... -- (x) [y]", "the quick brown fox " * 30]


@pytest.mark.golden
def test_cli_export_matches_pytorch_and_the_reference(reference, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(reference.checkpoint), str(out), *OPENAI_FLAGS]) == 0
    assert "max abs diff" in capsys.readouterr().out
    for name in (IMAGE_FILE, TEXT_FILE, CONFIG_FILE, "bpe_vocab.txt.gz"):
        assert (out / name).is_file()
    config = json.loads((out / CONFIG_FILE).read_text())
    assert set(config["parity"]["by_check"]) >= {"image_b1", "image_b3", "text_b1_int32", "text_b3_int64"}
    assert all((out / f).is_file() for f in config["external_data"].values()) and len(config["external_data"]) == 2
    model, _ = clipforge.load(reference.checkpoint, **OPENAI)
    check_fresh_inputs(out, model)
    diff = check_against_reference(out, reference)
    print(f"{reference.id} ONNX max abs diff vs the recorded outputs: {diff:.3g}")
    assert diff <= 1e-4
    # A client without clipforge: tokenizer.json (HF tokenizers) gives clipforge's ids and feeds the text graph.
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(out / config["tokenizer"]["file"]))
    texts = TRICKY_TEXTS + [c for c in reference.captions if "&" not in c]  # HTML entities: the documented difference
    ours = clipforge.get_tokenizer(reference.checkpoint, context_length=model.context_length)(texts, truncate=True)
    ids = np.array([e.ids for e in fast.encode_batch(texts)])
    assert ids.shape == tuple(ours.shape)
    for text, theirs, mine in zip(texts, ids.tolist(), ours.tolist()):
        assert theirs == mine, repr(text)
    embeddings = OnnxCLIP(out).text_session.run(["embeddings"], {"tokens": ids})[0]
    with torch.no_grad():
        want = model.encode_text(ours, normalize=True).numpy()
    np.testing.assert_allclose(embeddings, want, atol=1e-5, rtol=0)


def test_export_resnet_matches_pytorch(tmp_path):
    # The Python API on a ResNet, fresh clone or not (the reference RN-tiny runs above where the shared fixtures are).
    model = perturb_(clipforge.create_model("cpu-rn-tiny-64", seed=0)).eval()
    config = export_onnx(model, tmp_path)
    assert config["tokenizer"]["context_length"] == model.context_length == 32
    check_fresh_inputs(tmp_path, model)


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
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main(["export", "onnx", "cpu-vit-tiny-32", str(tmp_path / "out"), "--random-weights"]) == 2
    assert "needs onnxscript: pip install 'clipforge[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int8_export_runs_quantised_graphs_close_to_fp32(tmp_path):
    import onnx

    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0)).eval()
    config = export_onnx(model, tmp_path, int8=True)
    assert config["image_encoder"] == "image_encoder.int8.onnx"
    assert config["text_encoder"] == "text_encoder.int8.onnx"
    for name in (config["image_encoder"], config["text_encoder"]):
        ops = {node.op_type for node in onnx.load(str(tmp_path / name)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # the matmuls really run in integers
    runner = OnnxCLIP(tmp_path)  # reads the int8 graphs the config names
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    captions = ["a red circle", "two cats on a sofa", ""]
    tokens = clipforge.get_tokenizer("cpu-vit-tiny-32", context_length=model.context_length)(captions)
    with torch.no_grad():
        want_image = model.encode_image(pixels, normalize=True).numpy()
        want_text = model.encode_text(tokens, normalize=True).numpy()
    got_image, got_text = runner.encode_image(pixels.numpy()), runner.embed_texts(captions)
    cosines = np.concatenate([(want_image * got_image).sum(1), (want_text * got_text).sum(1)])
    assert cosines.min() > 0.99 and np.abs(got_image - want_image).max() > 1e-6  # close, and not the fp32 graph


def test_export_device_flag(tmp_path, capsys):
    out = tmp_path / "out"
    # A GPU that is not there is refused as everywhere else, before anything is written.
    assert main(["export", "onnx", "cpu-vit-tiny-32", str(out), "--random-weights", "--device", "cuda:64"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge export: error: device 'cuda:64': ") and "GPU" in error
    assert not out.exists()
    assert main(["export", "onnx", "cpu-vit-tiny-32", str(out), "--random-weights", "--device", "cpu"]) == 0
    assert "onnxruntime vs PyTorch: max abs diff" in capsys.readouterr().out
    assert json.loads((out / CONFIG_FILE).read_text())["parity"]["max_abs_diff"] <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_export_traces_on_a_gpu_and_checks_on_the_cpu(tmp_path):
    model = perturb_(clipforge.create_model("cpu-rn-tiny-64", seed=0)).eval().cuda()
    config = export_onnx(model, tmp_path)  # its parity check ran on the CPU, where onnxruntime runs
    assert config["parity"]["max_abs_diff"] <= 1e-4
    assert all(p.device.type == "cuda" for p in model.parameters())  # back where it was
    check_fresh_inputs(tmp_path, model.cpu())


def test_siglip_export_keeps_its_pooling_bias_tokenizer_and_squash(spiece_model, tmp_path):
    from PIL import Image

    from clipforge.text import SentencePieceTokenizer

    model = perturb_(clipforge.create_model("cpu-siglip-tiny-32", seed=0)).eval()
    model.preprocess_config = clipforge.model.config.PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3,
                                                                      resize="squash")
    tokenizer = SentencePieceTokenizer(spiece_model, context_length=model.context_length)
    config = export_onnx(model, tmp_path, tokenizer=tokenizer, int8=True)
    assert config["logit_bias"] == pytest.approx(model.logit_bias.item())
    assert config["preprocess"]["resize_mode"] == "squash" and config["tokenizer"]["kind"] == "sentencepiece"
    runner = OnnxCLIP(tmp_path)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 70, 3), dtype=np.uint8))
    transform = clipforge.EvalTransform.for_model(model)
    np.testing.assert_allclose(runner.preprocess(wide), transform(wide).numpy(), atol=1e-6)  # no crop
    captions = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        want_image = model.encode_image(transform(wide)[None], normalize=True).numpy()
        want_text = model.encode_text(tokenizer(captions), normalize=True).numpy()
    cosines = np.concatenate([(runner.embed_images([wide]) * want_image).sum(1),
                              (runner.embed_texts(captions) * want_text).sum(1)])
    assert cosines.min() > 0.99 and config["int8"]  # the int8 graphs, run by the runner, stay close
