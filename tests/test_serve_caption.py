"""`POST /caption` on a server whose index was built with a CoCa model: the model's own captions, the same upload
checks and limits as the other image endpoints, and no such route for a contrastive model."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import clipforge
from clipforge.serve import ServeConfig, create_app
from conftest import perturb_
from test_serve import assert_error, make_images, png_bytes


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    from clipforge.search import build_index

    root = tmp_path_factory.mktemp("coca-serve")
    model = perturb_(clipforge.create_model("cpu-coca-tiny-32", seed=0)).eval()
    folder = clipforge.save_pretrained(model, root / "model")
    paths = make_images(root / "images")
    build_index(root / "images", root / "index", model=str(folder), batch_size=8, progress=False)
    with TestClient(create_app(root / "index")) as client:
        yield client, folder, paths


def test_caption_endpoint_returns_the_models_caption(coca):
    client, folder, paths = coca
    from PIL import Image

    model, preprocess = clipforge.load(folder)
    pixels = preprocess(Image.open(paths[2]))[None]
    for params, settings in [({}, dict(strategy="greedy", max_length=30)),
                             ({"strategy": "beam", "num_beams": 2, "max_length": 8},
                              dict(strategy="beam", num_beams=2, max_length=8))]:
        response = client.post("/caption", params=params, files={"file": ("x.png", paths[2].read_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        expected = clipforge.decode(model.generate(pixels, **settings))[0]
        assert response.json()["caption"] == expected and response.json()["strategy"] == settings["strategy"]
    assert "/caption" in client.get("/openapi.json").json()["paths"]


def test_caption_endpoint_checks_uploads_and_parameters(coca):
    client, _, paths = coca
    good = ("x.png", paths[0].read_bytes(), "image/png")
    assert_error(client.post("/caption", files={"file": ("x.png", b"this is not an image", "image/png")}), 415)
    assert_error(client.post("/caption", files={"file": ("x.png", b"", "image/png")}), 400, "empty")
    assert_error(client.post("/caption", data={"other": "field"}), 422, "file")
    assert_error(client.post("/caption", files={"file": ("t.png", paths[1].read_bytes()[:60], "image/png")}), 415)
    for params in ({"strategy": "sample"}, {"num_beams": 0}, {"num_beams": 9}, {"max_length": 1},
                   {"max_length": 33}, {"max_length": "x"}):
        assert_error(client.post("/caption", params=params, files={"file": good}), 422)


def test_caption_limits_and_a_contrastive_index_has_no_caption_route(coca, tmp_path):
    from PIL import Image

    client, _, _ = coca
    small = ServeConfig(max_image_pixels=100_000)
    with TestClient(create_app(client.app.state.serve.index.path, small,
                               encoder=client.app.state.encoder)) as limited:
        bomb = png_bytes(Image.new("1", (2000, 2000)))
        assert_error(limited.post("/caption", files={"file": ("bomb.png", bomb, "image/png")}), 413, "pixels")
    from test_serve import build_test_index

    index, _ = build_test_index(tmp_path)
    with TestClient(create_app(index)) as plain:
        assert plain.post("/caption", files={"file": ("x.png", b"x", "image/png")}).status_code in (404, 405)
        assert "/caption" not in plain.get("/openapi.json").json()["paths"]
