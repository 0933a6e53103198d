"""Pretrained weights over real HTTP on loopback: verified cache, resumed downloads, offline mode, the hub path."""
from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

import clipforge
from clipforge import LoadOptions
from clipforge.pretrained import cache_dir, download, registry
from conftest import OPENAI, perturb_


class Server:
    """Files by URL path; HEAD answers like the Hugging Face hub; `drop_after[path]` cuts the first GET short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.reply(body=False)

            def do_GET(self) -> None:
                self.reply(body=True)

            def reply(self, body: bool) -> None:
                server.requests.append((self.command, self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{server.etags.get(self.path, hashlib.sha1(data).hexdigest())}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.end_headers()
                if not body:
                    return
                cut = server.drop_after.pop(self.path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CLIPFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def weights(fixtures_dir) -> bytes:
    return (fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors").read_bytes()


@pytest.mark.integration
def test_download_is_verified_cached_and_resumed(server, weights):
    server.files["/w/ViT-tiny.safetensors"] = weights
    server.drop_after["/w/ViT-tiny.safetensors"] = len(weights) // 3  # the first transfer breaks off
    sha = hashlib.sha256(weights).hexdigest()
    path = download(f"{server.url}/w/ViT-tiny.safetensors", sha, progress=False)
    assert path.read_bytes() == weights and path.parent.name == sha
    ranges = [r for _, _, r in server.requests]
    assert ranges == [None, f"bytes={len(weights) // 3}-"]  # the second request resumed where the first stopped
    assert download(f"{server.url}/w/ViT-tiny.safetensors", sha, progress=False) == path
    assert len(server.requests) == 2  # a cache hit asks nothing


@pytest.mark.integration
def test_checksum_mismatch_keeps_nothing(server, weights):
    server.files["/w/x.safetensors"] = weights
    with pytest.raises(ValueError, match="does not match the published"):
        download(f"{server.url}/w/x.safetensors", "0" * 64, progress=False)
    assert not list(cache_dir().rglob("*x.safetensors*"))


@pytest.mark.integration
def test_offline_mode_names_the_file_and_where_to_put_it(server, weights, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    sha = hashlib.sha256(weights).hexdigest()
    url = f"{server.url}/w/ViT-tiny.safetensors"
    with pytest.raises(ValueError, match=r"offline mode .* download http://127\.0\.0\.1:\d+/w/ViT-tiny\.safetensors "
                                         r"on a connected machine and put it at (\S+)") as raised:
        download(url, sha, progress=False)
    target = Path(str(raised.value).split("put it at ")[1].split(" (sha256")[0])
    target.parent.mkdir(parents=True)
    target.write_bytes(weights)  # what a user does with the message
    assert download(url, sha, progress=False) == target and not server.requests


@pytest.mark.golden
@pytest.mark.integration
def test_load_by_tag_downloads_and_runs_the_tag(server, reference, tmp_path, monkeypatch):
    weights = reference.checkpoint.read_bytes()
    model, _ = clipforge.load(reference.checkpoint, **OPENAI)
    clipforge.save_pretrained(model, tmp_path / "arch", format="open_clip")  # the architecture, as a config
    server.files["/w/tiny.safetensors"] = weights
    entry = registry.PretrainedTag("tiny-test", "fixture", str(tmp_path / "arch" / "open_clip_config.json"), "",
                                   (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), url=f"{server.url}/w/tiny.safetensors",
                                   sha256=hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(registry, "_table", lambda: {("tiny-test", "fixture"): entry})
    model, preprocess = clipforge.load("tiny-test", pretrained="fixture")
    expected = reference.expected()
    with torch.no_grad():
        got = model.encode_image(expected["pixels"])
    assert (got - expected["image_features"]).abs().max() < 1e-4  # the reference implementation's numbers
    assert preprocess.mean == (0.5, 0.5, 0.5)  # the tag's normalisation, not the default
    with pytest.raises(ValueError, match="its tags: fixture"):
        clipforge.load("tiny-test", pretrained="other")


@pytest.mark.integration
def test_hub_repo_through_hf_endpoint_then_offline(server, fixtures_dir, tmp_path, monkeypatch):
    fixture = fixtures_dir / "openai-vit-tiny"
    reference, _ = clipforge.load(fixture / "openai_state_dict.safetensors", **OPENAI)
    clipforge.save_pretrained(reference, tmp_path / "oc", format="open_clip")
    weights = (tmp_path / "oc" / "open_clip_model.safetensors").read_bytes()
    base = "/org/tiny/resolve/main"
    server.files[f"{base}/open_clip_config.json"] = (tmp_path / "oc" / "open_clip_config.json").read_bytes()
    server.files[f"{base}/open_clip_model.safetensors"] = weights
    server.etags[f"{base}/open_clip_model.safetensors"] = hashlib.sha256(weights).hexdigest()  # as the hub: LFS sha
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    model, _ = clipforge.load("hf-hub:org/tiny")
    tokens = clipforge.get_tokenizer("hf-hub:org/tiny")(["a photo of a dog."])
    with torch.no_grad():
        assert (model.encode_text(tokens) - reference.encode_text(tokens)).abs().max() < 1e-6
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(server.requests)
    assert clipforge.load("hf-hub:org/tiny")[0].config == model.config and len(server.requests) == asked
    with pytest.raises(ValueError, match=r"offline mode .*hf-hub:org/other/open_clip_config\.json is not in the"):
        clipforge.load("hf-hub:org/other")


@pytest.mark.integration
def test_hub_file_with_a_wrong_checksum_is_removed(server, fixtures_dir, tmp_path, monkeypatch):
    reference, _ = clipforge.load(fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors", **OPENAI)
    clipforge.save_pretrained(reference, tmp_path / "oc", format="open_clip")
    base = "/org/bad/resolve/main"
    server.files[f"{base}/open_clip_config.json"] = (tmp_path / "oc" / "open_clip_config.json").read_bytes()
    server.files[f"{base}/open_clip_model.safetensors"] = (tmp_path / "oc/open_clip_model.safetensors").read_bytes()
    server.etags[f"{base}/open_clip_model.safetensors"] = "ab" * 32  # the hub says another sha256
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(ValueError, match="does not match the hub's abab"):
        clipforge.load("hf-hub:org/bad")
    hf_cache = tmp_path / "hf"
    assert not list(hf_cache.rglob("blobs/abab*")) and not list(hf_cache.rglob("snapshots/*/*.safetensors"))


def test_registry_lists_openai_checkpoints_with_their_published_sha256(monkeypatch):
    openai = {name: registry.get_pretrained(name, tag) for name, tag in clipforge.list_pretrained() if tag == "openai"}
    nine = {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
    assert nine <= set(openai) and len({e.sha256 for e in openai.values()}) == 9
    for _name, entry in openai.items():
        assert entry.architecture.endswith("-quickgelu")  # OpenAI trained with QuickGELU: never loaded as GELU
        assert entry.sha256 in entry.url and len(entry.sha256) == 64
    assert registry.get_pretrained("ViT-L-14", "laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)
    assert registry.get_pretrained("ViT-H-14", "dfn5b").resize == "squash"  # DFN resizes without a crop, as SigLIP
    siglip = {name for name, tag in clipforge.list_pretrained() if "SigLIP" in name}
    assert {"ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "ViT-B-16-SigLIP2", "ViT-gopt-16-SigLIP2-384"} <= siglip
    assert {registry.get_pretrained(name, "webli").resize for name in siglip} == {"squash"}
    odd = registry.PretrainedTag("x", "bilinear", "ViT-B-32", "org/x", (0.5,) * 3, (0.5,) * 3,
                                 unsupported="preprocessing bilinear")
    monkeypatch.setattr(registry, "_table", lambda: {("x", "bilinear"): odd})
    assert clipforge.list_pretrained() == []
    with pytest.raises(ValueError, match="preprocessing bilinear"):
        registry.get_pretrained("x", "bilinear")


@pytest.mark.integration
def test_index_and_query_by_architecture_and_tag(server, weights, fixtures_dir, tmp_path, monkeypatch):
    from PIL import Image

    from clipforge.search import ImageIndex, QueryEncoder, build_index

    reference, _ = clipforge.load(fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors", **OPENAI)
    clipforge.save_pretrained(reference, tmp_path / "arch", format="open_clip")
    server.files["/w/tiny.safetensors"] = weights
    entry = registry.PretrainedTag("tiny-test", "fixture", str(tmp_path / "arch" / "open_clip_config.json"), "",
                                   reference.preprocess_config.mean, reference.preprocess_config.std,
                                   url=f"{server.url}/w/tiny.safetensors", sha256=hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(registry, "_table", lambda: {("tiny-test", "fixture"): entry})
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "images" / f"{i}.png")
    build_index(tmp_path / "images", tmp_path / "index", model="tiny-test", pretrained="fixture", progress=False)
    index = ImageIndex.open(tmp_path / "index")
    assert (index.model, index.pretrained) == ("tiny-test", "fixture")
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # the weights are cached now
    encoder = QueryEncoder(index.model, pretrained=index.pretrained)
    query = encoder.embed_images([Image.open(tmp_path / "images" / "2.png")])
    assert index.record(int(index.search(query, 1)[1][0, 0]))["path"].endswith("2.png")
    with pytest.raises(ValueError, match=r"built with model tiny-test \(pretrained fixture\), not tiny-test"):
        build_index(tmp_path / "images", tmp_path / "index", model="tiny-test", progress=False)


def test_siglip_tag_loads_open_clip_timm_weights_with_its_tokenizer_and_preprocessing(server, spiece_model, tmp_path,
                                                                                      monkeypatch):
    transformers = pytest.importorskip("transformers")
    from clipforge.text import SentencePieceTokenizer
    from test_siglip_open_clip import open_clip_state_dict

    # the preset with the test's 150-piece SentencePiece vocabulary: a tag whose tokenizer is not CLIP's BPE
    original = perturb_(clipforge.create_model("cpu-siglip-tiny-32", text__vocab_size=150)).eval()
    arch = clipforge.save_pretrained(original, tmp_path / "arch", tokenizer=SentencePieceTokenizer(spiece_model))
    clipforge.save_pretrained(original, tmp_path / "hf", format="hf", tokenizer=SentencePieceTokenizer(spiece_model))
    hf_model = transformers.SiglipModel.from_pretrained(tmp_path / "hf")
    weights = safetensors.torch.save(open_clip_state_dict(hf_model))  # open_clip's names: a timm image tower
    base = "/org/siglip-tiny/resolve/main"
    server.files[f"{base}/open_clip_model.safetensors"] = weights
    server.etags[f"{base}/open_clip_model.safetensors"] = hashlib.sha256(weights).hexdigest()
    server.files[f"{base}/spiece.model"] = spiece_model.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    entry = registry.PretrainedTag("cpu-siglip-tiny-32", "fixture", str(arch / "clipforge.json"), "org/siglip-tiny",
                                   (0.5,) * 3, (0.5,) * 3, resize="squash")
    monkeypatch.setattr(registry, "_table", lambda: {("cpu-siglip-tiny-32", "fixture"): entry})
    model, _ = clipforge.load("cpu-siglip-tiny-32", pretrained="fixture")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), original.encode_image(pixels), rtol=1e-5, atol=1e-5)
    assert (model.preprocess_config.resize, model.preprocess_config.mean) == ("squash", (0.5,) * 3)
    asked = len(server.requests)
    tokenizer = clipforge.get_tokenizer("cpu-siglip-tiny-32", options=LoadOptions(pretrained="fixture"))
    assert tokenizer.kind == "sentencepiece" and tokenizer(["a cat"]).shape == (1, 32)
    assert not any("safetensors" in path for _, path, _ in server.requests[asked:])  # the tokenizer alone
