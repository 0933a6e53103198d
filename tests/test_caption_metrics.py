"""BLEU and CIDEr-D equal the COCO caption evaluation's own scorers (pycocoevalcap) on the same tokenised inputs."""
from __future__ import annotations

import random

import pytest

from clipforge.errors import EvaluationError
from clipforge.evaluate.captioning import bleu, caption_scores, caption_words, cider_d

WORDS = "a the cat dog red blue sits on mat sofa two small big emoji of with and in".split()


def _corpus(seed: int, images: int = 12) -> tuple[list[list[str]], list[list[list[str]]]]:
    rng = random.Random(seed)
    sentence = lambda: [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]  # noqa: E731
    references = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(images)]
    hypotheses = [rng.choice(refs)[: rng.randint(1, 6)] + sentence()[:2] for refs in references]
    return hypotheses, references


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bleu_and_cider_d_equal_pycocoevalcap(seed):
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    hypotheses, references = _corpus(seed)
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, per_image = Cider().compute_score(gts, res)
    assert bleu(hypotheses, references) == pytest.approx(expected_bleu, rel=1e-12, abs=1e-15)
    mean, ours = cider_d(hypotheses, references)
    assert mean == pytest.approx(expected_cider, rel=1e-12) and ours == pytest.approx(list(per_image), rel=1e-12)


def test_caption_scores_tokenise_and_refuse_bad_input():
    assert caption_words("A Cat, sitting on the MAT!") == ["a", "cat", "sitting", "on", "the", "mat"]
    perfect = caption_scores(["a red cat.", "two dogs"], [["A red cat"], ["two dogs", "dogs"]])
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["cider_d"] > 0
    wrong = caption_scores(["blue sofa", "a mat"], [["A red cat"], ["two dogs"]])
    assert wrong["bleu4"] < 1e-6 and wrong["cider_d"] == 0.0
    with pytest.raises(EvaluationError, match="one hypothesis per image"):
        bleu([["a"]], [])
    with pytest.raises(EvaluationError, match="at least one reference"):
        cider_d([["a"]], [[]])


def test_eval_task_captioning_scores_the_models_own_captions(tmp_path, capsys):
    import json

    import torch

    import clipforge
    from clipforge.cli.main import main
    from conftest import perturb_
    from synthetic import make_caption_set

    table = make_caption_set(tmp_path, per_concept=1, seed=0)
    model = perturb_(clipforge.create_model("cpu-coca-tiny-32", seed=0)).eval()
    clipforge.save_pretrained(model, tmp_path / "coca")
    assert main(["eval", "--task", "captioning", "--model", str(tmp_path / "coca"), "--data", str(table),
                 "--out", str(tmp_path / "out"), "--caption-beams", "2", "--caption-max-length", "8", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    from clipforge.data.labelled import decode_all, load_captioned_images

    loaded, preprocess = clipforge.load(tmp_path / "coca")
    captioned = load_captioned_images(table)
    pixels, _ = decode_all(captioned.paths, preprocess)
    with torch.no_grad():
        written = clipforge.decode(loaded.generate(pixels, strategy="beam", num_beams=2, max_length=8))
    references = [[c for c, i in zip(captioned.captions, captioned.caption_to_image.tolist()) if i == row]
                  for row in range(len(written))]
    assert results["cider_d"] == pytest.approx(caption_scores(written, references)["cider_d"])
    assert results["images"] == len(written) and results["examples"][0]["generated"] == written[0]
    assert main(["eval", "--task", "captioning", "--model", "cpu-vit-tiny-32", "--random-weights", "--data",
                 str(table), "--out", str(tmp_path / "no")]) == 2
    assert "captioning decoder" in capsys.readouterr().err
