"""`clipforge serve`: every endpoint through FastAPI's TestClient, good and bad input, and the micro-batcher."""
from __future__ import annotations

import io
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient  # needs httpx, of the test extra: a missing one fails here, loudly
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.device import resolve_device
from clipforge.serve import ServeConfig, create_app
from clipforge.serve.batching import MicroBatcher

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (250, 250, 250), "purple": (140, 40, 160), "orange": (250, 140, 20)}


def make_images(folder: Path) -> list[Path]:
    """Eight small PNGs: a coloured square with a contrasting shape, one per colour."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (48 + 4 * i, 40), rgb)
        image.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (8, 8, 8 + 3 * i + 6, 30))
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(path)
    return paths


def build_test_index(root: Path) -> tuple[Path, list[Path]]:
    """A saved tiny random model and an index of the generated images built with it."""
    from clipforge.search import build_index

    model = clipforge.create_model("cpu-vit-tiny-32").eval()
    model_dir = clipforge.save_pretrained(model, root / "model")
    paths = make_images(root / "images")
    build_index(root / "images", root / "index", model=str(model_dir), batch_size=8, progress=False)
    return root / "index", paths


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_test_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(built):
    with TestClient(create_app(built[0])) as test_client:
        yield test_client


def assert_error(response, status: int, *words: str) -> None:
    """A JSON error with the expected status and a message naming the problem."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    for word in words:
        assert word in body["error"], body["error"]


def test_healthz_page_and_openapi(client, built):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["images"] == len(built[1]) and health["dim"] == 64
    assert "/" not in health["model"]  # a name, not the server's path
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="q"' in page.text and 'id="drop"' in page.text and 'id="results"' in page.text
    spec = client.get("/openapi.json").json()
    paths = {"/embed/text", "/embed/image", "/search", "/search/image", "/images/{image_id}", "/healthz"}
    assert paths <= set(spec["paths"])


def test_search_text_returns_ranked_servable_results(client, built):
    body = client.get("/search", params={"q": "a red square", "k": 3}).json()
    assert body["k"] == 3 and len(body["results"]) == 3
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    names = {p.name: p for p in built[1]}
    for result in body["results"]:
        assert result["url"] == f"/images/{result['id']}" and result["name"] in names
        image = client.get(result["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content == names[result["name"]].read_bytes()
    # k above the index size returns the whole index, once each.
    every = client.get("/search", params={"q": "anything", "k": 100}).json()["results"]
    assert len(every) == len(built[1]) and len({r["id"] for r in every}) == len(built[1])


def test_search_rejects_bad_parameters(client):
    for params, word in [({"q": "x", "k": 0}, "k"), ({"q": "x", "k": 101}, "k"), ({"q": "x", "k": "ten"}, "k"),
                         ({}, "q"), ({"q": ""}, "q"), ({"q": "   "}, "blank"), ({"q": "x" * 501}, "q"),
                         ({"q": "word " * 40}, "context")]:
        assert_error(client.get("/search", params=params), 422, word)


def test_embed_text(client):
    response = client.post("/embed/text", json={"texts": ["a red square", "a blue square"]})
    assert response.status_code == 200, response.text
    vectors = np.array(response.json()["embeddings"], dtype=np.float32)
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    direct = client.app.state.encoder.embed_texts(["a red square", "a blue square"])
    assert np.abs(vectors - direct).max() < 1e-5  # batching with other requests changes nothing
    for body, word in [({"texts": []}, "texts"), ({"texts": ["x"] * 33}, "texts"), ({"texts": [""]}, "texts"),
                       ({"texts": ["x" * 501]}, "texts"), ({"texts": [3]}, "texts"), ({"text": "x"}, "texts"),
                       ({"texts": ["fine", "word " * 40]}, "context")]:
        assert_error(client.post("/embed/text", json=body), 422, word)
    assert_error(client.post("/embed/text", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_embed_and_search_by_image(client, built):
    red = built[1][0]
    response = client.post("/embed/image", files={"file": ("q.png", red.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    vector = np.array(response.json()["embedding"], dtype=np.float32)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    upload = {"file": ("q.png", red.read_bytes(), "image/png")}
    body = client.post("/search/image", params={"k": 2}, files=upload).json()
    assert len(body["results"]) == 2
    assert body["results"][0]["name"] == red.name and body["results"][0]["score"] > 0.999  # finds itself
    assert_error(client.post("/search/image", params={"k": 1000},
                             files={"file": ("q.png", red.read_bytes(), "image/png")}), 422, "k")


def test_uploads_are_checked(client, built):
    for url in ("/embed/image", "/search/image"):
        assert_error(client.post(url, files={"file": ("x.png", b"this is not an image", "image/png")}), 415, "not")
        assert_error(client.post(url, files={"file": ("x.png", b"", "image/png")}), 400, "empty")
        assert_error(client.post(url, data={"other": "field"}), 422, "file")
        truncated = built[1][1].read_bytes()[:60]
        assert_error(client.post(url, files={"file": ("t.png", truncated, "image/png")}), 415)


def test_upload_limits(client, built):
    small = ServeConfig(max_upload_bytes=2000, max_image_pixels=100_000)
    with TestClient(create_app(built[0], small, encoder=client.app.state.encoder)) as limited:
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        big = png_bytes(noise)  # ~12 KB: over the 2000-byte file limit, under the body limit
        assert_error(limited.post("/embed/image", files={"file": ("big.png", big, "image/png")}), 413, "2000")
        huge_body = b"0" * (2000 + 70 * 1024)  # over the whole-body limit: refused before parsing
        assert_error(limited.post("/search/image", files={"file": ("big.png", huge_body, "image/png")}), 413)
        bomb = png_bytes(Image.new("1", (2000, 2000)))  # tiny file, 4 Mpx once decoded
        assert len(bomb) < 2000
        assert_error(limited.post("/embed/image", files={"file": ("bomb.png", bomb, "image/png")}), 413, "pixels")


def test_images_serves_only_indexed_files(client, built):
    assert_error(client.get("/images/999999"), 404, "999999")
    assert_error(client.get("/images/-1"), 404)
    assert_error(client.get("/images/2448997821753227486890557440"), 404)  # beyond SQLite's integers
    for attempt in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/abc", "/images/1.5"):
        response = client.get(attempt)
        assert response.status_code in (404, 422) and "error" in response.json()
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.post("/healthz"), 405)


def test_deleted_file_is_404_not_500(tmp_path, client):
    index_dir, paths = build_test_index(tmp_path)
    with TestClient(create_app(index_dir)) as fresh:
        result = fresh.get("/search", params={"q": "x", "k": 1}).json()["results"][0]
        (tmp_path / "images" / result["name"]).unlink()
        assert_error(fresh.get(result["url"]), 404, "gone")


def test_missing_index(tmp_path, capsys):
    with pytest.raises((FileNotFoundError, ValueError)):
        create_app(tmp_path / "no-index")
    (tmp_path / "empty").mkdir()
    with pytest.raises((FileNotFoundError, ValueError)):
        create_app(tmp_path / "empty")
    assert main(["serve", str(tmp_path / "no-index")]) == 2
    assert "error" in capsys.readouterr().err


def test_concurrent_requests_share_batches(client):
    batcher = client.app.state.batchers["text"]
    before = (batcher.batches, batcher.items)
    queries = [f"query number {i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: client.get("/search", params={"q": q, "k": 2}), queries))
    assert all(r.status_code == 200 for r in responses)
    batches, items = batcher.batches - before[0], batcher.items - before[1]
    assert items == len(queries) and batches <= len(queries)


def test_micro_batcher_batches_and_propagates_errors():
    sizes: list[int] = []

    def double(items: list[int]) -> np.ndarray:
        sizes.append(len(items))
        time.sleep(0.02)  # a forward pass: requests pile up meanwhile
        if -1 in items:
            raise ValueError("bad item")
        return np.array(items)[:, None] * 2

    batcher = MicroBatcher(double, max_batch=8, max_wait_s=0.01)
    try:
        futures = [batcher.submit(i) for i in range(20)]
        assert [int(f.result(5)[0]) for f in futures] == [2 * i for i in range(20)]
        assert max(sizes) <= 8 and len(sizes) < 20  # batched, never over the cap
        with pytest.raises(ValueError, match="bad item"):
            batcher.submit(-1).result(5)
        # A bad item fails only its own caller, not the others in its batch.
        mixed = [batcher.submit(i) for i in (1, 2, -1, 3)]
        assert [int(f.result(5)[0]) for f in (mixed[0], mixed[1], mixed[3])] == [2, 4, 6]
        with pytest.raises(ValueError, match="bad item"):
            mixed[2].result(5)
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(batcher.submit(i).result(5))) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 10
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_images_inside_a_shard_are_served(tmp_path, client, built):
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in built[1][:3]:
            tar.add(path, arcname=f"sample/{path.stem}.png")
            caption = tmp_path / f"{path.stem}.txt"
            caption.write_text(f"a {path.stem} picture")
            tar.add(caption, arcname=f"sample/{path.stem}.txt")
    from clipforge.search import build_index

    build_index(str(shard), tmp_path / "index", model=client.app.state.index.model, progress=False)
    with TestClient(create_app(tmp_path / "index", encoder=client.app.state.encoder)) as shards:
        results = shards.get("/search", params={"q": "a picture", "k": 5}).json()["results"]
        assert len(results) == 3 and all(r["caption"].endswith("picture") for r in results)
        by_name = {p.name: p for p in built[1]}
        for result in results:
            image = shards.get(result["url"])
            assert image.status_code == 200 and image.content == by_name[result["name"]].read_bytes()
        shard.unlink()
        assert_error(shards.get(results[0]["url"]), 404, "gone")


def test_index_removed_under_a_running_server(tmp_path, client, built):
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(built[0], index_dir)
    app = create_app(index_dir, encoder=client.app.state.encoder)
    shutil.rmtree(index_dir)  # vectors stay in memory; metadata lookups from a new thread fail
    with TestClient(app) as orphan:
        assert_error(orphan.get("/search", params={"q": "x", "k": 2}), 503, "restart")
        assert_error(orphan.get("/images/1"), 503, "unavailable")
        assert orphan.get("/healthz").status_code == 200


def test_spec_documents_every_limit_and_code(client):
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/embed/image"]["post"]["responses"]
    assert "empty" in responses["400"]["description"]
    assert "50000000 pixels" in responses["413"]["description"] and "10485760 bytes" in responses["413"]["description"]
    context = client.app.state.encoder.model.context_length
    text_422 = spec["paths"]["/embed/text"]["post"]["responses"]["422"]["description"]
    assert f"context of {context} tokens" in text_422 and "500 characters" in text_422 and "32 texts" in text_422
    body = client.get("/search", params={"q": "word " * 40}).json()
    assert body["status"] == 422 and f"context of {context} tokens" in body["error"]
    assert "truncate" not in body["error"]  # no advice about a flag the API does not have


def test_index_of_random_weights_is_refused_unless_asked(tmp_path, built):
    from clipforge.search import build_index

    make_images(tmp_path / "images")
    with pytest.warns(UserWarning, match="random weights"):
        build_index(tmp_path / "images", tmp_path / "index", model="cpu-vit-tiny-32", progress=False)
    with pytest.raises(ValueError, match="registry architecture without weights.*--random-weights"):
        create_app(tmp_path / "index")
    with TestClient(create_app(tmp_path / "index", ServeConfig(allow_random_weights=True))) as random_client:
        assert random_client.get("/healthz").json()["images"] == len(COLOURS)
    assert main(["serve", str(tmp_path / "index")]) == 2


def test_healthz_reports_the_device_in_use(built, client):
    with TestClient(create_app(built[0], ServeConfig(device="auto"))) as auto:
        assert auto.get("/healthz").json()["limits"]["device"] == str(resolve_device("auto")) != "auto"
    # A given encoder runs where its model is, whatever the config says.
    with TestClient(create_app(built[0], ServeConfig(device="auto"), encoder=client.app.state.encoder)) as given:
        assert given.get("/healthz").json()["limits"]["device"] == "cpu"


def serve_cli(*args: str) -> list[str]:
    """The command line of the real `clipforge serve`, in a fresh interpreter."""
    return [sys.executable, "-m", "clipforge.cli.main", "serve", *args]


def test_serve_on_a_taken_port_exits_2_without_claiming_to_serve(built):
    with socket.socket() as taken:  # another server, listening on a loopback port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(serve_cli(str(built[0]), "--port", str(port)), capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.startswith(f"clipforge serve: error: cannot listen on 127.0.0.1:{port} ")
    assert result.stderr.count("\n") == 1 and "--port" in result.stderr  # one line, naming the fix


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints, waiting at most `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"nothing printed within {timeout} s"
    return proc.stdout.readline()


def test_serve_cli_serves_on_a_free_port_reports_its_device_and_stops_on_ctrl_c(built):
    proc = subprocess.Popen(serve_cli(str(built[0]), "--port", "0", "--log-level", "warning"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first_line(proc, 300)
        url = re.search(r" at (http://127\.0\.0\.1:\d+)/ ", line)
        assert url and not url.group(1).endswith(":0"), line  # the port the OS picked, not the flag's 0
        deadline = time.monotonic() + 60
        while True:  # the line comes just before uvicorn starts accepting
            try:
                health = httpx.get(f"{url.group(1)}/healthz", timeout=10).json()
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server never accepted a connection"
                time.sleep(0.1)
        assert health["images"] == len(COLOURS) and health["limits"]["device"] == str(resolve_device("auto"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
