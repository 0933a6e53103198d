"""CoCa: open_clip's CoCa weights load into CLIP's towers with CoCa's options and a captioning decoder; embeddings,
caption logits and generated tokens equal open_clip's own model code on an odd config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.model.generation import GenerationConfig, Specials, beam_search, greedy_or_sample

VOCAB, CONTEXT, SOT, EOS = 300, 12, 298, 299
CONFIG = {  # odd sizes: head widths 16 and 8, 7 pooler queries, a 300-token vocabulary
    "embed_dim": 40,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 5, "attn_pooler_queries": 7, "output_tokens": True},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 40, "heads": 5, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 40, "heads": 5, "layers": 2,
                       "attn_pooler_heads": 5},
    "custom_text": True,
}


@pytest.fixture
def pair(open_clip_package, tmp_path):
    """(open_clip's CoCa with moved random weights, the same weights loaded by clipforge from an open_clip folder)."""
    return _pair(open_clip_package, tmp_path, CONFIG)


def _with_vocab(vocab: int) -> dict:
    return {**CONFIG, "text_cfg": {**CONFIG["text_cfg"], "vocab_size": vocab},
            "multimodal_cfg": {**CONFIG["multimodal_cfg"], "vocab_size": vocab}}


def _pair(open_clip_package, tmp_path, config: dict):
    torch.manual_seed(0)
    model_cfg = {k: v for k, v in config.items() if k != "custom_text"}
    reference = open_clip_package.CoCa(**model_cfg).eval()
    with torch.no_grad():  # parameters only: its causal-mask buffers must stay masks
        for param in reference.parameters():
            if not torch.isfinite(param).all():  # open_clip's CoCa leaves the decoder's projection uninitialised
                torch.nn.init.normal_(param, std=0.02)
            param.add_(0.02 * torch.randn_like(param))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    model, _ = clipforge.load(tmp_path)
    return reference, model


def _texts() -> torch.Tensor:
    rows = torch.randint(1, SOT, (4, CONTEXT), generator=torch.Generator().manual_seed(3))
    rows[:, 0] = SOT
    rows[0, 5], rows[0, 6:] = EOS, 0  # padded after end-of-text
    rows[1, 3] = 0  # a 0 id inside the text: open_clip's CoCa masks it as padding (its key offset rule)
    rows[2, -1] = EOS
    return rows


def test_coca_embeddings_and_caption_logits_equal_open_clip(pair):
    reference, model = pair
    pixels, texts = torch.randn(3, 3, 32, 32), _texts()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=True), reference.encode_image(pixels),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_text(texts, normalize=True), reference.encode_text(texts),
                                   rtol=1e-4, atol=1e-4)
        expected = reference(pixels[:1].expand(4, -1, -1, -1), texts)["logits"]
        torch.testing.assert_close(model.caption_logits(pixels[:1].expand(4, -1, -1, -1), texts), expected,
                                   rtol=1e-4, atol=1e-4)
    assert model.config.decoder is not None and model.config.text.pool == "cls"


class OpenClipStepper:
    """The reference decoding step: open_clip's whole forward pass on the ids so far (no cache)."""

    def __init__(self, reference, pixels: torch.Tensor) -> None:
        self.reference, self.pixels = reference, pixels
        self.latent, self.embs = reference._encode_image(pixels)
        self.ids = torch.zeros(len(pixels), 0, dtype=torch.long)

    def step(self, new_ids: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, new_ids[:, None]], dim=1)
        out = self.reference(self.pixels, self.ids, image_latent=self.latent, image_embs=self.embs,
                             output_labels=False)
        return out["logits"][:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids, self.latent, self.embs, self.pixels = (x[rows] for x in (self.ids, self.latent, self.embs,
                                                                            self.pixels))


@pytest.mark.parametrize("settings", [
    dict(strategy="greedy", max_length=CONTEXT, min_length=3),
    dict(strategy="greedy", max_length=9, min_length=0, repetition_penalty=1.3),
    dict(strategy="beam", max_length=CONTEXT, num_beams=3, min_length=2),
    dict(strategy="beam", max_length=7, num_beams=4, length_penalty=0.5),
    dict(strategy="sample", max_length=CONTEXT, top_k=20, top_p=0.9, temperature=0.8, seed=7),
])
@pytest.mark.parametrize("early_eos", [False, True])
def test_generated_tokens_equal_decoding_open_clips_forward_pass(pair, settings, early_eos):
    reference, model = pair
    # float64: a search compares scores, and the cached and the recomputed forward pass differ by rounding; in
    # float32 two candidates a few 1e-7 apart could swap (end-of-text made to score like token 25 below)
    reference, model = reference.double(), model.double()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        if early_eos:  # end-of-text scores like a token these images pick often: rows end at different steps
            for decoder in (reference.text_decoder, model.text_decoder):
                decoder.text_projection[:, EOS] = decoder.text_projection[:, 25] * 1.01
        ours = model.generate(pixels, sot_token_id=SOT, eos_token_id=EOS, **settings)
        config, ids = GenerationConfig(**settings), Specials(SOT, EOS, 0)
        if config.strategy == "beam":
            beams = config.num_beams
            expected = beam_search(OpenClipStepper(reference, pixels.repeat_interleave(beams, 0)), 3, config, ids,
                                   pixels.device)
        else:
            expected = greedy_or_sample(OpenClipStepper(reference, pixels), 3, config, ids, pixels.device)
    assert torch.equal(ours, expected), (ours, expected)
    assert (ours[:, 0] == SOT).all() and ours.shape[1] <= settings["max_length"]


def test_coca_writes_back_as_open_clip_and_open_clip_loads_it(open_clip_package, tmp_path):
    (tmp_path / "in").mkdir()
    reference, model = _pair(open_clip_package, tmp_path / "in", _with_vocab(49408))  # CLIP's BPE: open_clip's
    clipforge.save_pretrained(model, tmp_path / "back", format="open_clip")
    settings = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())["model_cfg"]
    assert settings["custom_text"] and settings["vision_cfg"]["attentional_pool"] and "multimodal_cfg" in settings
    again = open_clip_package.CoCa(**{k: v for k, v in settings.items() if k != "custom_text"}).eval()
    from safetensors.torch import load_file

    again.load_state_dict(load_file(str(tmp_path / "back" / "open_clip_model.safetensors")), strict=True)
    pixels, texts = torch.randn(2, 3, 32, 32), _texts()[:2]
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, texts)["logits"], reference(pixels, texts)["logits"],
                                   rtol=1e-5, atol=1e-5)
    assert clipforge.load(tmp_path / "back")[0].config == model.config


def test_registry_coca_architectures_are_open_clips_own_configs():
    import importlib.util
    from pathlib import Path

    from clipforge.checkpoint.open_clip import config_from_open_clip

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed")
    configs = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    for name in ("coca_ViT-B-32", "coca_ViT-L-14"):
        theirs, _ = config_from_open_clip(json.loads((configs / f"{name}.json").read_text()), name)
        assert clipforge.get_model_config(name) == theirs, name
    assert ("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k") in clipforge.list_pretrained()
    tiny = clipforge.create_model("cpu-coca-tiny-32").eval()
    ids = tiny.generate(torch.randn(2, 3, 32, 32), strategy="beam", num_beams=2, max_length=6)
    assert ids.shape[0] == 2 and ids.shape[1] <= 6 and (ids[:, 0] == 49406).all()


def test_generate_refuses_what_it_cannot_do(pair):
    from clipforge.errors import ConfigError

    _, model = pair
    pixels = torch.randn(1, 3, 32, 32)
    for settings, match in [(dict(strategy="nucleus"), "strategy"), (dict(max_length=CONTEXT + 1), "text context"),
                            (dict(top_p=0.0), "top_p"), (dict(num_beams=0), "num_beams"),
                            (dict(max_length=CONTEXT), "sot_token_id")]:
        ids = {} if "sot_token_id" == match else dict(sot_token_id=SOT, eos_token_id=EOS)
        with pytest.raises(ConfigError, match=match):
            model.generate(pixels, **ids, **settings)
    with pytest.raises(ConfigError, match="at least one image"):
        model.generate(pixels[:0], sot_token_id=SOT, eos_token_id=EOS, max_length=CONTEXT)
    with pytest.raises(ConfigError, match="no captioning decoder"):
        clipforge.create_model("cpu-vit-tiny-32").generate(pixels)
    with pytest.raises(ConfigError, match="decoder's vocabulary"):  # generated ids feed the text tower back
        clipforge.create_model("cpu-coca-tiny-32", decoder={**clipforge.get_model_config(
            "cpu-coca-tiny-32").decoder.__dict__, "vocab_size": 50000})


def test_caption_command_writes_the_models_greedy_and_beam_captions(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from clipforge.cli.main import main
    from conftest import perturb_

    model = perturb_(clipforge.create_model("cpu-coca-tiny-32", seed=0)).eval()
    clipforge.save_pretrained(model, tmp_path / "coca")
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images[-1])
    loaded, preprocess = clipforge.load(tmp_path / "coca")
    pixels = torch.stack([preprocess(p) for p in images])
    for flags, settings in [([], dict(strategy="greedy")), (["--beam", "2"], dict(strategy="beam", num_beams=2))]:
        assert main(["caption", *map(str, images), "--model", str(tmp_path / "coca"), "--json", "--max-length", "10",
                     *flags]) == 0
        rows = json.loads(capsys.readouterr().out)
        with torch.no_grad():
            expected = clipforge.decode(loaded.generate(pixels, max_length=10, **settings))
        assert [r["caption"] for r in rows] == expected and [r["image"] for r in rows] == list(map(str, images))
    assert main(["caption", str(images[0]), "--model", "cpu-vit-tiny-32", "--random-weights"]) == 2
    assert "no captioning decoder" in capsys.readouterr().err
    assert main(["caption", str(images[0]), "--model", str(tmp_path / "coca"), "--beam", "2", "--strategy",
                 "sample"]) == 2
    assert "--beam is beam search" in capsys.readouterr().err


def test_prompt_likelihood_equals_open_clips_caption_logits(pair):
    from clipforge.model.generation import prompt_log_likelihood

    reference, model = pair
    pixels, prompts = torch.randn(2, 3, 32, 32), _texts()
    with torch.no_grad():
        ours = prompt_log_likelihood(model, pixels, prompts, chunk=3)
        for i in range(2):
            logits = reference(pixels[i : i + 1].expand(len(prompts), -1, -1, -1), prompts)["logits"]
            picked = logits.log_softmax(-1).gather(2, prompts[:, 1:, None])[..., 0]
            torch.testing.assert_close(ours[i], (picked * (prompts[:, 1:] != 0)).sum(1), rtol=1e-4, atol=1e-4)


def test_zeroshot_eval_of_a_coca_model_reports_caption_likelihood(tmp_path, capsys):
    from clipforge.cli.main import main
    from conftest import perturb_
    from synthetic import make_labelled_set

    data = make_labelled_set(tmp_path, per_concept=1)
    model = perturb_(clipforge.create_model("cpu-coca-tiny-32", seed=0)).eval()
    clipforge.save_pretrained(model, tmp_path / "coca")
    assert main(["eval", "--task", "zeroshot", "--model", str(tmp_path / "coca"), "--data", str(data),
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    likelihood = json.loads(capsys.readouterr().out)["caption_likelihood"]
    from clipforge.inference.templates import get_templates

    assert 0.0 <= likelihood["top1"] <= 1.0 and likelihood["images"] > 0
    assert likelihood["template"] == get_templates("openai_7")[0]  # the set's first template, as the ablation's
