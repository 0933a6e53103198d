"""Architecture from configs, never guessed: head width and activation through every load path (issue: silent
wrong loads of 32-wide heads and GELU models), against transformers' CLIPModel as the numerical reference."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers  # the parity reference (test extra)
from safetensors.torch import save_file

import clipforge
from clipforge.checkpoint.architecture import resolve_architecture
from conftest import perturb_, random_tokens

# 128-wide towers with 32-wide heads (4 heads): OpenAI's width/64 rule would build 2 heads.
NARROW_HEADS = {"embed_dim": 64, "vision": {"image_size": 32, "layers": 2, "width": 128, "heads": 4, "patch_size": 8,
                                            "quick_gelu": False},
                "text": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2,
                         "quick_gelu": False}}
OPEN_CLIP_CONFIG = {"model_cfg": {"embed_dim": 64, "quick_gelu": False,
                                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32,
                                                 "patch_size": 8},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4,
                                               "layers": 2}},
                    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                       "std": [0.26862954, 0.26130258, 0.27577711]}}


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """The 32-wide-head model in every layout, and the transformers reference loaded from its HF export."""
    root = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    model = perturb_(clipforge.create_model(clipforge.CLIPConfig.from_dict(NARROW_HEADS))).eval()
    clipforge.save_pretrained(model, root / "hf", format="hf")
    clipforge.save_pretrained(model, root / "clipforge")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "bare.safetensors"))
    (root / "open_clip").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "open_clip" / "open_clip_model.safetensors"))
    (root / "open_clip" / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    reference = transformers.CLIPModel.from_pretrained(root / "hf").eval()
    return root, reference


def _max_diff(model, reference) -> float:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = random_tokens(3, 77, [3, 20, 9])
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=pixels)
        text = reference.get_text_features(input_ids=tokens)
        image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
        return max((model.encode_image(pixels) - image).abs().max().item(),
                   (model.encode_text(tokens) - text).abs().max().item())


@pytest.mark.parametrize("path, kwargs", [
    ("hf", {}),                                                   # HF config.json
    ("clipforge", {}),                                            # clipforge.json
    ("open_clip", {}),                                            # open_clip hub layout: config + weights
    ("bare.safetensors", {"head_width": 32, "quick_gelu": False}),  # the caller's choice
    ("bare.safetensors", {"config": "open_clip/open_clip_config.json"}),  # a config given with the weights
])
@pytest.mark.parity
def test_32_wide_heads_load_exactly_through_every_path(narrow, path, kwargs):
    root, reference = narrow
    if "config" in kwargs:
        kwargs = {"config": root / kwargs["config"]}
    model, _ = clipforge.load(root / path, **kwargs)
    assert (model.config.vision.heads, model.config.text.heads, model.config.vision.quick_gelu) == (4, 4, False)
    assert _max_diff(model, reference) < 1e-4


@pytest.mark.parity
def test_open_clip_config_beside_a_weight_file_is_used(narrow, tmp_path):
    root, reference = narrow
    (tmp_path / "epoch_5.safetensors").write_bytes((root / "bare.safetensors").read_bytes())
    (tmp_path / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    assert _max_diff(clipforge.load(tmp_path / "epoch_5.safetensors")[0], reference) < 1e-4


@pytest.mark.parity
def test_bare_state_dict_without_a_choice_is_refused_and_a_guess_is_wrong(narrow):
    root, reference = narrow
    with pytest.raises(ValueError, match=r"bare\.safetensors: .*head width .*activation.*head_width=64"):
        clipforge.load(root / "bare.safetensors")
    with pytest.raises(ValueError, match="activation"):
        clipforge.load(root / "bare.safetensors", head_width=32)
    with pytest.raises(ValueError, match="head width"):
        clipforge.load(root / "bare.safetensors", quick_gelu=False)
    # What OpenAI's width/64 rule and its QuickGELU default would have loaded, silently:
    guessed, _ = clipforge.load(root / "bare.safetensors", head_width=64, quick_gelu=True)
    assert _max_diff(guessed, reference) > 1e-2
    wrong_activation, _ = clipforge.load(root / "bare.safetensors", head_width=32, quick_gelu=True)
    assert _max_diff(wrong_activation, reference) > 1e-3


@pytest.mark.parity
def test_cli_refuses_the_bare_state_dict_and_takes_the_choice(narrow, tmp_path, capsys):
    from clipforge.cli.main import main

    root, reference = narrow
    assert main(["convert", str(root / "bare.safetensors"), str(tmp_path / "guess")]) == 2
    assert "--head-width" in capsys.readouterr().err and not (tmp_path / "guess").exists()
    assert main(["convert", str(root / "bare.safetensors"), str(tmp_path / "ok"), "--head-width", "32", "--gelu"]) == 0
    assert _max_diff(clipforge.load(tmp_path / "ok")[0], reference) < 1e-4


def test_registry_supplies_open_clip_head_widths_but_not_the_activation():
    # ViT-H-14's 1280-wide image tower has 80-wide heads (16), not OpenAI's 64 (20).
    shapes = clipforge.get_model_config("ViT-H-14")
    shapes.vision.heads, shapes.text.heads = 20, 16  # what a width/64 guess would say
    with pytest.raises(ValueError, match=r"GELU \(ViT-H-14\) or QuickGELU \(ViT-H-14-quickgelu\)"):
        resolve_architecture(shapes, "h14.safetensors")
    resolved = resolve_architecture(shapes, "h14.safetensors", quick_gelu=False)
    assert resolved == clipforge.get_model_config("ViT-H-14")
    for name, head_width in (("ViT-g-14", 88), ("ViT-bigG-14", 104), ("ViT-B-32-quickgelu", 64)):
        config = clipforge.get_model_config(name)
        assert config.vision.width // config.vision.heads == head_width


def test_torchscript_archive_tells_its_activation(tmp_path):
    torch.manual_seed(0)
    config = clipforge.CLIPConfig.from_dict(NARROW_HEADS)
    for quick in (False, True):
        config.vision.quick_gelu = config.text.quick_gelu = quick
        model = perturb_(clipforge.create_model(config)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace_module(model, {"encode_image": (torch.randn(1, 3, 32, 32),)})
        torch.jit.save(traced, str(tmp_path / f"traced-{quick}.pt"))
        loaded, _ = clipforge.load(tmp_path / f"traced-{quick}.pt", head_width=32)
        assert loaded.config.vision.quick_gelu is quick
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert (loaded.encode_image(pixels) - model.encode_image(pixels)).abs().max() < 1e-5


def test_open_clip_features_clipforge_cannot_reproduce_are_refused(tmp_path):
    from clipforge.checkpoint.open_clip import config_from_open_clip

    for patch in ({"vision_cfg": {**OPEN_CLIP_CONFIG["model_cfg"]["vision_cfg"], "ls_init_value": 1e-5}},
                  {"vision_cfg": {**OPEN_CLIP_CONFIG["model_cfg"]["vision_cfg"], "timm_model_name": "vit_base"}},
                  {"text_cfg": {**OPEN_CLIP_CONFIG["model_cfg"]["text_cfg"], "hf_tokenizer_name": "bert"}}):
        with pytest.raises(ValueError, match="not supported|not CLIP's BPE"):
            config_from_open_clip({"model_cfg": {**OPEN_CLIP_CONFIG["model_cfg"], **patch}})
    with pytest.raises(ValueError, match="resize_mode"):
        config_from_open_clip({**OPEN_CLIP_CONFIG, "preprocess_cfg": {"resize_mode": "squash"}})
