"""Caption generation for CoCa models: greedy, beam search and sampling, one token per step with every layer's
keys and values cached (the text tower is causal, so earlier positions never change).

Conventions (open_clip's): rows start with the start-of-text id; a row that ended (end-of-text) is padded with
the pad id; `max_length` counts every id of a row, start-of-text included; end-of-text is forbidden until a row
holds `min_length` ids. Logit processing order: repetition penalty, then (sampling) temperature, top-k, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from clipforge.errors import ConfigError
from clipforge.model.decoder import KeysValues, block_step
from clipforge.model.text_tower import cls_key_mask
from clipforge.text.base import OPENAI_VOCAB_SIZE

STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class Specials:
    """The token ids decoding needs: start-of-text, end-of-text and padding."""

    sot: int
    eos: int
    pad: int = 0


class Stepper(Protocol):
    """Next-token logits, one appended id per row at a time (a cached model, or a reference that recomputes)."""

    def step(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Append `new_ids` [rows]; logits [rows, vocab] of the token after them."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep / repeat rows (beam search)."""


@dataclass
class GenerationConfig:
    """The decoding settings of `CLIP.generate` (checked before any work)."""

    strategy: str = "greedy"
    max_length: int = 30
    min_length: int = 5
    num_beams: int = 3
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search: hypotheses scored by sum of log-probs / length ** this
    seed: int | None = None  # sampling: a fixed generator (the same seed, the same captions)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_length < 2 or self.min_length < 0 or self.num_beams < 1 or self.top_k < 0:
            raise ConfigError(f"need max_length >= 2, min_length >= 0, num_beams >= 1, top_k >= 0; got "
                              f"{self.max_length}, {self.min_length}, {self.num_beams}, {self.top_k}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0 or self.repetition_penalty <= 0:
            raise ConfigError(f"need 0 < top_p <= 1, temperature > 0, repetition_penalty > 0; got {self.top_p}, "
                              f"{self.temperature}, {self.repetition_penalty}")


class CachedStepper:
    """Decoding steps of a CoCa model with every layer's keys and values cached (the text tower is causal, so
    earlier positions never change): each step runs one position through the towers."""

    def __init__(self, model: torch.nn.Module, image_tokens: torch.Tensor) -> None:
        self.model = model
        self.ids = torch.zeros(image_tokens.shape[0], 0, dtype=torch.long, device=image_tokens.device)
        self.contexts = model.text_decoder.contexts(image_tokens)  # the image tokens' cross-attention keys / values
        self.text_cache: list[KeysValues | None] = [None] * len(model.text_tower.transformer.resblocks)
        self.decoder_cache: list[KeysValues | None] = [None] * len(model.text_decoder.resblocks)

    def step(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Append one id per row; the next-token logits [rows, vocab] (float32, or float64 for a float64 model)."""
        tower = self.model.text_tower
        position = self.ids.shape[1]
        self.ids = torch.cat([self.ids, new_ids[:, None]], dim=1)
        x = tower.token_embedding(new_ids[:, None]) + tower.positional_embedding[position].to(
            tower.token_embedding.weight.dtype)
        # keys 0..position: open_clip's CoCa padding rule; a plain EOT tower's teacher-forced pass masks nothing
        keep = cls_key_mask(self.ids)[:, : position + 1] if tower.pool_cls else None
        for i, block in enumerate(tower.transformer.resblocks):
            x, self.text_cache[i] = block_step(block, x, self.text_cache[i], keep)
        logits = self.model.text_decoder.step(x, self.contexts, self.decoder_cache)
        return logits if logits.dtype == torch.float64 else logits.float()  # search in float32 at least

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep / repeat rows among one image's beams (beam search): the ids and the self-attention caches follow
        their rows; the cross-attention keys of the image tokens are the same for all of an image's beams."""
        pick = lambda kv: None if kv is None else (kv[0][rows], kv[1][rows])  # noqa: E731
        self.ids = self.ids[rows]
        self.text_cache = [pick(kv) for kv in self.text_cache]
        self.decoder_cache = [pick(kv) for kv in self.decoder_cache]


def process(logits: torch.Tensor, ids: torch.Tensor, config: GenerationConfig, eos_id: int) -> torch.Tensor:
    """Repetition penalty (on ids already in the row) and the minimum length (no end-of-text yet)."""
    if config.repetition_penalty != 1.0:
        seen = logits.gather(1, ids)
        logits = logits.scatter(1, ids, torch.where(seen < 0, seen * config.repetition_penalty,
                                                    seen / config.repetition_penalty))
    if ids.shape[1] < config.min_length:
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
    return logits


def _filtered(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set of tokens whose probability reaches top_p)."""
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        better = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, better >= config.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def greedy_or_sample(stepper: Stepper, rows: int, config: GenerationConfig, ids: Specials,
                     device: torch.device) -> torch.Tensor:
    """Rows of ids [rows, <= max_length]: the best (greedy) or a drawn (sample) token at every step."""
    generator = None
    if config.strategy == "sample" and config.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
    out = torch.full((rows, 1), ids.sot, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    logits = stepper.step(out[:, 0])
    while out.shape[1] < config.max_length:
        scores = process(logits, out, config, ids.eos)
        if config.strategy == "greedy":
            chosen = scores.argmax(dim=-1)
        else:
            chosen = torch.multinomial(_filtered(scores, config).softmax(dim=-1), 1, generator=generator)[:, 0]
        chosen = torch.where(finished, torch.full_like(chosen, ids.pad), chosen)
        out = torch.cat([out, chosen[:, None]], dim=1)
        finished |= chosen == ids.eos
        if bool(finished.all()) or out.shape[1] == config.max_length:
            break
        logits = stepper.step(chosen)
    return out


@dataclass
class _Hypotheses:
    """One image's finished beams: at most `size`, best first, scored by sum of log-probs / length ** penalty."""

    size: int
    penalty: float
    kept: list[tuple[float, list[int]]] = field(default_factory=list)

    def add(self, ids: list[int], sum_logprobs: float) -> None:
        self.kept.append((sum_logprobs / len(ids) ** self.penalty, ids))
        self.kept.sort(key=lambda kept: -kept[0])
        del self.kept[self.size:]

    def done(self, best_running: float, length: int) -> bool:
        """Full, and no running beam can still beat the worst kept one (its score only falls as it grows)."""
        return len(self.kept) == self.size and best_running / length ** self.penalty <= self.kept[-1][0]


def beam_search(stepper: Stepper, rows: int, config: GenerationConfig, ids: Specials,
                device: torch.device) -> torch.Tensor:
    """The best of `num_beams` hypotheses per image [rows, <= max_length]; `stepper` holds rows * num_beams rows
    (each image's beams next to each other). Of the 2 * beams best continuations of an image, an end-of-text
    among the first `beams` closes a hypothesis, and the best `beams` others continue."""
    beams = config.num_beams
    out = torch.full((rows * beams, 1), ids.sot, dtype=torch.long, device=device)
    logits = stepper.step(out[:, 0])
    scores = torch.full((rows, beams), float("-inf"), device=device, dtype=logits.dtype)
    scores[:, 0] = 0.0  # one live beam at first, so the first step's beams differ
    found = [_Hypotheses(beams, config.length_penalty) for _ in range(rows)]
    done = [False] * rows
    while True:
        logprobs = process(logits, out, config, ids.eos).log_softmax(dim=-1)
        vocab = logprobs.shape[-1]
        top_scores, top_index = (scores.view(-1, 1) + logprobs).view(rows, beams * vocab).topk(2 * beams, dim=1)
        source, tokens, next_scores = [], [], []
        for row in range(rows):
            chosen = [(beam, ids.pad, float(scores[row, beam])) for beam in range(beams)] if done[row] else \
                _advance(row, top_scores[row].tolist(), top_index[row].tolist(), vocab, out, found[row], beams, ids)
            source += [row * beams + beam for beam, _, _ in chosen]
            tokens += [token for _, token, _ in chosen]
            next_scores += [score for _, _, score in chosen]
            done[row] = done[row] or found[row].done(chosen[0][2], out.shape[1] + 1)
        source_rows = torch.tensor(source, device=device)
        chosen_ids = torch.tensor(tokens, device=device)
        stepper.reorder(source_rows)
        out = torch.cat([out[source_rows], chosen_ids[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device, dtype=scores.dtype).view(rows, beams)
        if all(done) or out.shape[1] == config.max_length:
            break
        logits = stepper.step(chosen_ids)
    return _best(found, out, scores, done, beams, ids.pad)


def _advance(row: int, values: list[float], indices: list[int], vocab: int, out: torch.Tensor,
             found: _Hypotheses, beams: int, ids: Specials) -> list[tuple[int, int, float]]:
    """One image's next beams (beam, token, score); an end-of-text among the best `beams` closes a hypothesis."""
    chosen: list[tuple[int, int, float]] = []
    for rank, (value, index) in enumerate(zip(values, indices)):
        beam, token = divmod(index, vocab)
        if token == ids.eos:
            if rank < beams:
                found.add([*out[row * beams + beam].tolist(), token], value)
        else:
            chosen.append((beam, token, value))
        if len(chosen) == beams:
            break
    return chosen


def _best(found: list[_Hypotheses], out: torch.Tensor, scores: torch.Tensor, done: list[bool], beams: int,
          pad: int) -> torch.Tensor:
    """Each image's best hypothesis (an image cut by max_length also counts its running beams), padded."""
    best = []
    for row, hypotheses in enumerate(found):
        if not done[row]:
            for beam in range(beams):
                if scores[row, beam] > float("-inf"):
                    hypotheses.add(out[row * beams + beam].tolist(), float(scores[row, beam]))
        best.append(hypotheses.kept[0][1])
    width = max(len(b) for b in best)
    return torch.tensor([b + [pad] * (width - len(b)) for b in best], dtype=torch.long, device=out.device)


@torch.no_grad()
def generate_ids(model: torch.nn.Module, images: torch.Tensor, sot_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0, **settings: Any) -> torch.Tensor:
    """`CLIP.generate`: encode the images once, then decode with the cached stepper."""
    config = GenerationConfig(**settings)
    if config.max_length > model.config.text.context_length:
        raise ConfigError(f"max_length {config.max_length} is more than the text context "
                          f"{model.config.text.context_length}")
    vocab = model.config.text.vocab_size
    if (sot_token_id is None or eos_token_id is None) and vocab != OPENAI_VOCAB_SIZE:
        raise ConfigError(f"a {vocab}-token vocabulary is not CLIP's: pass sot_token_id and eos_token_id")
    ids = Specials(vocab - 2 if sot_token_id is None else sot_token_id,
                   vocab - 1 if eos_token_id is None else eos_token_id, pad_token_id)
    was_training = model.training
    model.eval()
    try:
        if not len(images):
            raise ConfigError("generate needs at least one image")
        image_tokens = model.visual.forward_tokens(images.to(model.logit_scale.device, model.dtype))[1]
        rows, device = image_tokens.shape[0], image_tokens.device
        if config.strategy == "beam":
            stepper = CachedStepper(model, image_tokens.repeat_interleave(config.num_beams, dim=0))
            return beam_search(stepper, rows, config, ids, device)
        return greedy_or_sample(CachedStepper(model, image_tokens), rows, config, ids, device)
    finally:
        model.train(was_training)


def decode(ids: torch.Tensor, tokenizer: Any = None) -> list[str]:
    """Text of each row of generated ids (start-of-text dropped, cut at end-of-text), with the model's tokenizer
    (default: CLIP's BPE, which open_clip's CoCa weights use)."""
    if tokenizer is None:
        from clipforge.text.tokenizer import default_tokenizer

        tokenizer = default_tokenizer()
    if not hasattr(tokenizer, "decode"):
        raise ConfigError(f"a {type(tokenizer).__name__} cannot decode ids into text")
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(row) for row in ids]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


@torch.no_grad()
def prompt_log_likelihood(model: torch.nn.Module, pixels: torch.Tensor, prompts: torch.Tensor,
                          chunk: int = 256) -> torch.Tensor:
    """[images, prompts] summed log-probability a CoCa decoder gives each prompt's tokens after start-of-text
    (padding excluded) given each image: zero-shot classification by caption likelihood. `chunk`: (image, prompt)
    pairs per decoder call."""
    device = model.logit_scale.device
    prompts = prompts.to(device)
    used = (prompts != 0).any(dim=0).nonzero()
    prompts = prompts[:, : max(2, int(used.max()) + 1 if len(used) else 2)]  # causal: trailing padding changes nothing
    contexts = model.text_decoder.contexts(model.visual.forward_tokens(pixels.to(device, model.dtype))[1])
    states = model.text_tower.embed_and_tokens(prompts)[1][:, :-1]  # text states do not depend on the image
    targets, keep = prompts[:, 1:], (prompts[:, 1:] != 0).float()
    pairs = torch.cartesian_prod(torch.arange(len(pixels)), torch.arange(len(prompts))).view(-1, 2).to(device)
    scores = torch.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        image, prompt = pairs[start : start + chunk].unbind(dim=1)
        per_layer = ((k[image], v[image]) for k, v in contexts)  # one layer's gathered keys at a time
        logprobs = model.text_decoder(None, states[prompt], per_layer)
        picked = logprobs.float().log_softmax(dim=-1).gather(2, targets[prompt, :, None])[..., 0]
        scores[start : start + chunk] = (picked * keep[prompt]).sum(dim=1).cpu()  # float32 on the CPU
    return scores.view(len(pixels), len(prompts))


def caption_texts(model: torch.nn.Module, pixels: torch.Tensor, tokenizer: Any, **settings: Any) -> list[str]:
    """Captions of preprocessed pixels: `CLIP.generate` with the tokenizer's special ids, decoded by it."""
    ids = model.generate(pixels, sot_token_id=getattr(tokenizer, "sot_token_id", None),
                         eos_token_id=tokenizer.eot_token_id, **settings)
    return decode(ids.cpu(), tokenizer)
