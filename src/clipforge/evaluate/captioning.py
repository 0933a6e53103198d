"""Caption metrics as the COCO caption evaluation computes them: corpus BLEU-1..4 (closest reference length, its
smoothing constants) and CIDEr-D (tf-idf n-gram vectors over the references, clipped, with a Gaussian length
penalty, sigma 6, x10). Texts are lower-cased, ASCII punctuation dropped, split on whitespace (the COCO code
runs Stanford's PTB tokenizer in Java first; clipforge does not need Java)."""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from clipforge.data.labelled import decode_all
from clipforge.errors import EvaluationError
from clipforge.evaluate.report import Section
from clipforge.evaluate.tasks import EvalContext, decode_captioned
from clipforge.model.generation import caption_texts, prompt_log_likelihood

if TYPE_CHECKING:
    from clipforge.data.labelled import LabelledImages

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_TINY, _SMALL = 1e-15, 1e-9  # the COCO code's: a zero count still gives a (near-)zero precision
Words = list[str]


def caption_words(text: str) -> Words:
    """Lower case, punctuation to spaces, whitespace-split."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).split()


def ngrams(words: Words, n: int = 4) -> Counter:
    """Counts of every 1..n-gram of a word list."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(hypotheses: Sequence[Words], references: Sequence[Sequence[Words]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise EvaluationError(f"need one hypothesis per image with its references: {len(hypotheses)} hypotheses, "
                              f"{len(references)} reference lists")
    if any(not refs for refs in references):
        raise EvaluationError("every image needs at least one reference caption")


def bleu(hypotheses: Sequence[Words], references: Sequence[Sequence[Words]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: clipped n-gram matches over all images, brevity penalty against each image's reference
    length closest to its hypothesis (ties: the shorter)."""
    _check(hypotheses, references)
    correct, guess = [0] * n, [0] * n
    test_length = reference_length = 0
    for words, refs in zip(hypotheses, references):
        best: Counter = Counter()
        for ref in refs:
            best |= ngrams(ref, n)  # the most times any one reference has each n-gram
        for gram, count in ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, best[gram])
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        test_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1 / (k + 1)))
    ratio = (test_length + _TINY) / (reference_length + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [score * penalty for score in scores]


def _tfidf(counts: Counter, document_frequency: Counter, log_images: float,
           n: int) -> tuple[list[dict], list[float], int]:
    """Per n, the tf-idf vector and its norm; and the COCO code's length (its count of bigrams)."""
    vectors: list[dict] = [{} for _ in range(n)]
    norms = [0.0] * n
    length = 0
    for gram, count in counts.items():
        k = len(gram) - 1
        vectors[k][gram] = count * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms[k] += vectors[k][gram] ** 2
        if k == 1:
            length += count
    return vectors, [math.sqrt(v) for v in norms], length


def cider_d(hypotheses: Sequence[Words], references: Sequence[Sequence[Words]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(mean, per image) CIDEr-D: for each n, the cosine of clipped tf-idf vectors against each reference, damped
    by the length difference, averaged over n and references, x10; document frequencies from the references."""
    _check(hypotheses, references)
    reference_counts = [[ngrams(ref, n) for ref in refs] for refs in references]
    frequency: Counter = Counter()
    for counts in reference_counts:
        frequency.update({gram for ref in counts for gram in ref})
    log_images = math.log(len(references))
    scores = []
    for words, refs in zip(hypotheses, reference_counts):
        vec, norm, length = _tfidf(ngrams(words, n), frequency, log_images, n)
        total = [0.0] * n
        for ref in refs:
            ref_vec, ref_norm, ref_length = _tfidf(ref, frequency, log_images, n)
            damping = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(value, ref_vec[k].get(gram, 0.0)) * ref_vec[k].get(gram, 0.0)
                          for gram, value in vec[k].items())
                if norm[k] and ref_norm[k]:
                    dot /= norm[k] * ref_norm[k]
                total[k] += dot * damping
        scores.append(10.0 * sum(total) / n / len(refs))
    return sum(scores) / len(scores), scores


def caption_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of generated captions against each image's reference captions."""
    hypotheses = [caption_words(c) for c in captions]
    refs = [[caption_words(r) for r in group] for group in references]
    bleus = bleu(hypotheses, refs)
    return {**{f"bleu{k + 1}": score for k, score in enumerate(bleus)}, "cider_d": cider_d(hypotheses, refs)[0]}


def captioning(ctx: EvalContext, data: str | Path, domains: Sequence[str] | None = None, split: str | None = None,
               num_beams: int = 3, max_length: int = 30, name: str = "captioning") -> dict[str, Any]:
    """Captions written by a CoCa model for every image of a caption table, scored against its captions."""
    model = ctx.model
    if getattr(model, "text_decoder", None) is None:
        raise EvaluationError("--task captioning needs a model with a captioning decoder (CoCa)")
    captioned, pixels, keep, _ = decode_captioned(ctx, data, domains, split)
    kept = [i for i, k in enumerate(keep) if k]
    references: list[list[str]] = [[] for _ in kept]
    position = {image: row for row, image in enumerate(kept)}
    for caption, image in zip(captioned.captions, captioned.caption_to_image.tolist()):
        if image in position:
            references[position[image]].append(caption)
    settings = dict(strategy="beam" if num_beams > 1 else "greedy", num_beams=num_beams,
                    max_length=min(max_length, model.context_length))
    written: list[str] = []
    with torch.no_grad():
        for start in range(0, len(pixels), 32):
            written += caption_texts(model, pixels[start : start + 32], ctx.tokenizer, **settings)
    scores = caption_scores(written, references)
    examples = [{"image": str(captioned.paths[kept[i]]), "generated": written[i], "references": " | ".join(refs)}
                for i, refs in enumerate(references[:8])]
    text = (f"{len(written)} images, {sum(map(len, references))} reference captions; {settings['strategy']} "
            f"decoding ({num_beams} beams), at most {settings['max_length']} ids. BLEU and CIDEr-D as the COCO "
            "caption evaluation computes them.")
    ctx.sections.append(Section(name, text, [{k: round(v, 4) for k, v in scores.items()}, *examples]))
    return {"images": len(written), "decoding": settings, **scores, "examples": examples}


def likelihood_zeroshot(ctx: EvalContext, data: LabelledImages, template: str) -> dict[str, Any]:
    """Zero-shot top-1 of a CoCa model by caption likelihood: each image takes the class whose prompt its decoder
    finds most likely (summed token log-probabilities), beside the contrastive classifier's."""
    pixels, keep = decode_all(data.paths, ctx.preprocess)
    labels = data.labels[torch.tensor(keep)]
    prompts = ctx.tokenizer([template.format(name) for name in data.classnames])
    scores = torch.cat([prompt_log_likelihood(ctx.model, pixels[start : start + 16], prompts)
                        for start in range(0, len(pixels), 16)])
    top1 = float((scores.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")
    return {"template": template, "images": len(labels), "top1": top1}
