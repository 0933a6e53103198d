"""Checkpoint interop: reference fixtures, open_clip/TorchScript/HF formats, round trips and bad input."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.errors import ConfigError
from conftest import OPENAI, OPENAI_FLAGS, perturb_, random_tokens


@pytest.mark.golden
def test_fixture_reproduced_from_pngs_and_captions(reference):
    expected = reference.expected()
    assert reference.weight_files, reference.folder
    for weights in reference.weight_files:  # the safetensors file, and the torch.save pickle where there is one
        model, preprocess = clipforge.load(weights, **OPENAI)
        pixels = torch.stack([preprocess(image) for image in reference.images])
        tokens = clipforge.get_tokenizer(weights)(reference.captions)
        assert torch.allclose(pixels, expected["pixels"], atol=1e-6), weights.name
        assert torch.equal(tokens, expected["tokens"]), weights.name
        with torch.no_grad():
            image, text = model.encode_image(pixels), model.encode_text(tokens)
        assert (image - expected["image_features"]).abs().max() < 1e-4, weights.name
        assert (text - expected["text_features"]).abs().max() < 1e-4, weights.name
        assert abs(model.logit_scale.exp().item() - expected["logit_scale"].item()) < 1e-4, weights.name


def _roundtrip_features(model, other, size):
    pixels = torch.randn(2, 3, size, size)
    tokens = random_tokens(3, model.context_length, [2, 6, 11])
    with torch.no_grad():
        for a, b in ((model.encode_image(pixels), other.encode_image(pixels)),
                     (model.encode_text(tokens), other.encode_text(tokens))):
            assert (a - b).abs().max() < 1e-5


def test_open_clip_training_checkpoint(tmp_path, fixtures_dir):
    ref, _ = clipforge.load(fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors", **OPENAI)
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    model, _ = clipforge.load(tmp_path / "epoch_3.pt", **OPENAI)
    _roundtrip_features(ref, model, 32)


def test_torchscript_archive_read_without_running_code(tmp_path):
    # A ResNet in OpenAI's head layout (64-wide heads, QuickGELU), as OpenAI's RN archives are.
    ref = perturb_(clipforge.create_model("cpu-rn-tiny-64", seed=0, text__heads=1, vision__quick_gelu=True,
                                          text__quick_gelu=True)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(ref, {"encode_image": (torch.randn(1, 3, 64, 64),)})
    torch.jit.save(traced, str(tmp_path / "RN-tiny.pt"))
    model, _ = clipforge.load(tmp_path / "RN-tiny.pt", head_width=64)  # the activation: from the code
    assert model.config.vision.quick_gelu and model.config.text.heads == 1
    _roundtrip_features(ref, model, 64)


@pytest.mark.parametrize("name", ["cpu-vit-tiny-32", "cpu-rn-tiny-64"])
def test_clipforge_format_roundtrip(tmp_path, name):
    model = perturb_(clipforge.create_model(name, seed=0)).eval()
    clipforge.save_pretrained(model, tmp_path / "m")
    loaded, preprocess = clipforge.load(tmp_path / "m")
    assert loaded.config == model.config and preprocess.image_size == model.image_size
    _roundtrip_features(model, loaded, model.image_size)
    assert clipforge.get_tokenizer(tmp_path / "m").context_length == model.context_length


def test_pickles_never_execute_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ValueError, match="evil.pt: not a plain weights file") as raised:
        clipforge.load(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(raised.value)  # torch's advice would run the file's code


def test_a_training_run_folder_names_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), run / "step-00000007")
    (run / "config.json").write_text(json.dumps({"model": "cpu-vit-tiny-32"}))  # the run's TrainConfig
    (run / "latest").write_text("step-00000007")
    with pytest.raises(ValueError, match=r"training run folder.*latest is .*run/step-00000007"):
        clipforge.load(run)
    assert clipforge.load(run / "step-00000007")[0].config.embed_dim > 0


def test_bad_inputs_have_clear_errors(tmp_path, fixtures_dir):
    source = fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"
    state = load_file(str(source))
    with pytest.raises(ValueError, match="known names: .*ViT-B-32"):
        clipforge.load("ViT-Q-1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no clipforge.json"):
        clipforge.load(tmp_path / "empty")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: 100_000])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        clipforge.load(truncated)
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        clipforge.load(tmp_path / "zero.pt")
    missing = dict(state)
    missing.pop("ln_final.bias")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors.*missing keys: ln_final\.bias"):
        clipforge.load(tmp_path / "missing.safetensors", **OPENAI)
    bad_shape = dict(state)
    bad_shape["visual.ln_pre.weight"] = torch.zeros(7)
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"visual\.ln_pre\.weight: file \(7,\)"):
        clipforge.load(tmp_path / "shape.safetensors", **OPENAI)
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an OpenAI-layout CLIP state dict"):
        clipforge.load(tmp_path / "other.safetensors")


def test_resnet_refuses_hf_format(tmp_path):
    model = clipforge.create_model("cpu-rn-tiny-64")
    with pytest.raises(ValueError, match="no ResNet image tower"):
        clipforge.save_pretrained(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_convert_resnet_to_hf_names_the_formats_that_work(tmp_path):
    model = tmp_path / "rn"
    clipforge.save_pretrained(clipforge.create_model("cpu-rn-tiny-64", seed=0), model)
    result = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "convert", str(model), str(tmp_path / "hf"),
                             "--format", "hf"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    message = result.stderr.strip()
    assert message.startswith("clipforge convert: error:") and len(message.splitlines()) == 1, message
    assert "CLIPModel has no ResNet image tower" in message and "--format open_clip" in message, message
    assert "clipforge export onnx" in message, message
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parity
def test_open_clip_format_loads_with_open_clip_create_model(arch, tmp_path, fixtures_dir, open_clip_package):
    from clipforge.cli.main import main

    out = tmp_path / "oc"
    if arch == "vit":  # through the CLI, from OpenAI's layout
        source = fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"
        model, _ = clipforge.load(source, **OPENAI)
        assert main(["convert", str(source), str(out), "--format", "open_clip", *OPENAI_FLAGS]) == 0
    else:
        model = perturb_(clipforge.create_model("cpu-rn-tiny-64", seed=0)).eval()
        clipforge.save_pretrained(model, out, format="open_clip")
    reference = open_clip_package.create_model(f"local-dir:{out}").eval()  # open_clip reads config and weights
    pixels = torch.randn(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(2, model.context_length, [3, 9])
    with torch.no_grad():
        assert (reference.encode_image(pixels) - model.encode_image(pixels)).abs().max() < 1e-5
        assert (reference.encode_text(tokens) - model.encode_text(tokens)).abs().max() < 1e-5
    again, _ = clipforge.load(out)  # and clipforge reads the folder it wrote
    assert again.config == model.config


def test_open_clip_format_refuses_what_open_clip_cannot_run(tmp_path):
    lit = clipforge.create_model("cpu-vit-tiny-32", text_tower="minilm")
    with pytest.raises(ValueError, match="open_clip has no 'minilm' text tower"):
        clipforge.save_pretrained(lit, tmp_path / "lit", format="open_clip")
    assert not (tmp_path / "lit").exists()


def _checkpoint_of_kind(kind, tmp_path, fixtures_dir):
    """A checkpoint of each kind `load` reads, with a 32-token context where the kind records one."""
    if kind == "openai-file":  # OpenAI's bare layout records no context length: its releases all use 77
        return fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors", OPENAI
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0)).eval()
    if kind == "open_clip-file":  # open_clip's training output: weights with open_clip_config.json beside them
        clipforge.save_pretrained(model, tmp_path / "oc", format="open_clip")
        (tmp_path / "oc" / "open_clip_model.safetensors").rename(tmp_path / "oc" / "epoch_1.safetensors")
        return tmp_path / "oc" / "epoch_1.safetensors", {}
    return clipforge.save_pretrained(model, tmp_path / kind, format=kind), {}


@pytest.mark.parametrize("kind", ["clipforge", "hf", "open_clip", "open_clip-file", "openai-file"])
def test_load_and_get_tokenizer_read_every_checkpoint_alike(kind, tmp_path, fixtures_dir):
    from clipforge.model.towers import tokenizer_for

    path, flags = _checkpoint_of_kind(kind, tmp_path, fixtures_dir)
    model, _ = clipforge.load(path, **flags)
    tokenizer = clipforge.get_tokenizer(path)
    assert tokenizer.context_length == model.context_length
    captions = ["a photo of a dog.", "the quick brown fox jumps over the lazy dog " * 2]
    expected = tokenizer_for(model.config, path if path.is_dir() else None)(captions, truncate=True)
    assert torch.equal(tokenizer(captions, truncate=True), expected)
    with torch.no_grad():
        model.encode_text(tokenizer(captions[:1]))  # tokens this model takes as they come


def test_load_options_carry_the_choice_of_the_keywords(fixtures_dir):
    source = fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"
    by_keywords, _ = clipforge.load(source, **OPENAI)
    by_options, _ = clipforge.load(source, options=clipforge.LoadOptions(**OPENAI))
    assert by_options.config == by_keywords.config
    assert all(torch.equal(a, b) for a, b in zip(by_options.state_dict().values(), by_keywords.state_dict().values()))
    with pytest.raises(ValueError, match="head_width.*not both"):
        clipforge.load(source, options=clipforge.LoadOptions(quick_gelu=True), head_width=64)
    with pytest.raises(ValueError, match="head_width must be an int"):
        clipforge.LoadOptions(head_width="64")


def test_a_config_given_with_a_registry_name_is_refused_not_dropped(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(clipforge.get_model_config("cpu-vit-tiny-32").to_dict()))
    with pytest.raises(ConfigError, match="registry name"):
        clipforge.load("cpu-vit-tiny-32", config=config)
