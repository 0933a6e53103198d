"""Architecture configs (dataclasses) and the JSON registry of named architectures."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from clipforge.errors import ConfigError
from clipforge.text.base import DEFAULT_CONTEXT_LENGTH, OPENAI_VOCAB_SIZE

_ARCH_PACKAGE = "clipforge.model"
_ARCH_DIR = "architectures"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "squash")


@dataclass
class PreprocessConfig:
    """How a checkpoint's own library prepares images; `clipforge.load` picks it by origin, clipforge.json keeps it.

    OpenAI and open_clip drop transparency (`convert("RGB")`); transformers' CLIPImageProcessor
    composites it on white. Using the other rule moves pixels by up to 3.8 (normalised) on RGBA/LA/P.
    """

    composite_white: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # "crop": bicubic short side to the input size, centre crop (CLIP); "squash": bicubic resize of the whole
    # image to the square input size, no crop (SigLIP's SiglipImageProcessor)
    resize: str = "crop"
    # the squash's filter: SiglipImageProcessor's bicubic, or bilinear (Siglip2ImageProcessor's default)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(x) for x in self.mean), tuple(float(x) for x in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"preprocess mean and std need 3 values each, got {self.mean} and {self.std}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"preprocess resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in ("bicubic", "bilinear") or (self.interpolation != "bicubic" and
                                                                 self.resize == "crop"):
            raise ConfigError(f"preprocess interpolation {self.interpolation!r}: bicubic, or bilinear with squash")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (resize and interpolation only when not CLIP's: files older readers still load)."""
        out = {"composite_white": self.composite_white, "mean": list(self.mean), "std": list(self.std)}
        if self.resize != "crop":
            out["resize"] = self.resize
        return out if self.interpolation == "bicubic" else {**out, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """Build from `to_dict` output; unknown keys are an error."""
        return _make(cls, d, "preprocess")


@dataclass
class VisionConfig:
    """Image tower: a ViT when `layers` is an int, OpenAI's ModifiedResNet when it is 4 ints."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    heads: int | None = None  # None: width // 64 (ViT) or width * 32 // 64 (ResNet), as OpenAI infers
    patch_size: int = 32
    mlp_ratio: float = 4.0
    quick_gelu: bool = True
    layer_norm_eps: float = 1e-5
    gelu_tanh: bool = False  # GELU's tanh approximation (SigLIP); needs quick_gelu false
    # "class": a class token, pre-norm, post-norm on it (CLIP); "map": no class token, post-norm on every token,
    # then a multi-head attention-pooling head with a learned probe (SigLIP); "attentional": CLIP's tokens read by
    # `attn_pooler_queries` learned queries (open_clip's CoCa): the first, post-normed and projected, is the
    # embedding, the others are the image tokens a captioning decoder attends to
    pool: str = "class"
    projection: bool = True  # a final projection to embed_dim (SigLIP has none: width is embed_dim)
    # SigLIP 2's NaFlex: also takes patch rows at each image's own aspect ratio (`CLIP.encode_image_patches`),
    # positions resized from the image_size // patch_size square grid; transformers names it Siglip2Model
    naflex: bool = False
    attn_pooler_queries: int = 256  # pool "attentional" only
    attn_pooler_heads: int = 8  # pool "attentional" only

    def __post_init__(self) -> None:
        _check_options(self, "vision", pools=("class", "map", "attentional"))
        if self.naflex and self.pool != "map":
            raise ConfigError("vision naflex needs SigLIP's attention pool (pool 'map')")
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.is_resnet and len(self.layers) != 4:
            raise ConfigError(f"ResNet vision layers must be 4 ints, got {self.layers}")
        if self.heads is None:
            self.heads = self.width * 32 // 64 if self.is_resnet else max(1, self.width // 64)
        # SigLIP's So400m/14 at 384 px floors to 27x27 patches, as its convolution does; CLIP's ViTs divide evenly
        if not self.is_resnet and self.pool != "map" and self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def is_resnet(self) -> bool:
        """True for the ModifiedResNet tower."""
        return isinstance(self.layers, tuple)


@dataclass
class TextConfig:
    """Causal text Transformer pooled at the EOT (highest id) token."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    vocab_size: int = OPENAI_VOCAB_SIZE
    width: int = 512
    heads: int | None = None  # None: width // 64
    layers: int = 12
    mlp_ratio: float = 4.0
    quick_gelu: bool = True
    layer_norm_eps: float = 1e-5
    gelu_tanh: bool = False  # GELU's tanh approximation (SigLIP); needs quick_gelu false
    causal: bool = True  # causal attention (CLIP); false: every token attends to every token (SigLIP)
    # "eot": the features at the highest id (CLIP); "last": at the last position (SigLIP); "cls": a learned class
    # embedding appended after the tokens, normed and projected (open_clip's CoCa: padding keys masked, pad id 0)
    pool: str = "eot"
    projection_bias: bool = False  # a bias on the projection into the shared space (SigLIP)

    def __post_init__(self) -> None:
        _check_options(self, "text", pools=("eot", "last", "cls"))
        if self.pool == "cls" and not self.causal:
            raise ConfigError("text pool 'cls' is CoCa's causal tower: set causal true")
        if self.heads is None:
            self.heads = max(1, self.width // 64)
        if self.width % self.heads:
            raise ConfigError(f"text width {self.width} is not divisible by heads {self.heads}")


def _check_options(config: Any, where: str, pools: tuple[str, ...]) -> None:
    if config.pool not in pools:
        raise ConfigError(f"{where} pool must be one of {pools}, got {config.pool!r}")
    if config.gelu_tanh and config.quick_gelu:
        raise ConfigError(f"{where}: gelu_tanh and quick_gelu are two activations; set quick_gelu false")


@dataclass
class DecoderConfig:
    """CoCa's captioning decoder: causal self-attention over the text tower's token features, cross-attention to
    the image tokens, a projection to the vocabulary (open_clip's MultimodalTransformer)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 76
    vocab_size: int = OPENAI_VOCAB_SIZE
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"decoder width {self.width} is not divisible by heads {self.heads}")


@dataclass
class BagOfWordsConfig:
    """A bag-of-n-grams predictor on the image embedding (the CLIP paper's predictive baseline, Visual N-Grams'
    objective): the caption's token n-grams (1..ngram) hashed into `buckets` classes, predicted without order."""

    buckets: int = 16384
    ngram: int = 2

    def __post_init__(self) -> None:
        if self.buckets < 2 or not 1 <= self.ngram <= 4:
            raise ConfigError(f"bag_of_words needs buckets >= 2 and ngram in 1..4, got {self.buckets}, {self.ngram}")


@dataclass
class AudioConfig:
    """A bound audio tower (ImageBind's): a log-mel front end (Kaldi fbank: 25 ms Hann frames every 10 ms,
    pre-emphasis 0.97, `mel_bins` triangles from 20 Hz to Nyquist), then a ViT over the [1, mel_bins, frames]
    spectrogram with overlapping `patch_size` patches every `patch_stride` bins/frames."""

    sample_rate: int = 16000
    clip_seconds: float = 2.0  # one fixed-length crop (shorter audio is padded with silence)
    mel_bins: int = 128
    mel_mean: float = -4.268  # normalisation of the log-mel values: (x - mean) / std (ImageBind's AudioSet values)
    mel_std: float = 9.138
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    patch_stride: int = 10
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"audio width {self.width} is not divisible by heads {self.heads}")
        if self.sample_rate < 4000 or self.clip_seconds <= 0 or self.mel_std <= 0:
            raise ConfigError(f"audio needs sample_rate >= 4000, clip_seconds > 0 and mel_std > 0, got "
                              f"{self.sample_rate}, {self.clip_seconds}, {self.mel_std}")
        if not 0 < self.patch_stride <= self.patch_size <= min(self.mel_bins, self.frames):
            raise ConfigError(f"audio patches of {self.patch_size} every {self.patch_stride} do not fit a "
                              f"{self.mel_bins} x {self.frames} spectrogram")

    @property
    def frame_length(self) -> int:
        """Samples in one 25 ms analysis frame."""
        return self.sample_rate * 25 // 1000

    @property
    def hop_length(self) -> int:
        """Samples between frames (10 ms)."""
        return self.sample_rate // 100

    @property
    def samples(self) -> int:
        """Samples in one clip."""
        return round(self.sample_rate * self.clip_seconds)

    @property
    def frames(self) -> int:
        """Spectrogram frames of one clip (Kaldi's snip-edges framing: only whole frames)."""
        return max(0, 1 + (self.samples - self.frame_length) // self.hop_length)

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (along mel bins, along frames)."""
        return tuple(1 + (n - self.patch_size) // self.patch_stride for n in (self.mel_bins, self.frames))


# The tower options SigLIP and CoCa added, at their CLIP values (left out of config files that keep them).
_TOWER_OPTIONS = {"vision": {"gelu_tanh": False, "pool": "class", "projection": True, "naflex": False,
                             "attn_pooler_queries": 256, "attn_pooler_heads": 8},
                   "text": {"gelu_tanh": False, "causal": True, "pool": "eot", "projection_bias": False}}
TEXT_TOWER_NAMES = ("clip", "minilm")  # model.towers.TEXT_TOWERS holds their classes


@dataclass
class CLIPConfig:
    """A whole CLIP: two towers projected into an `embed_dim` space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = 2.659260036932778  # ln(1/0.07)
    text_tower: str = "clip"  # "clip": causal transformer; "minilm": pretrained all-MiniLM-L6-v2 + projection
    logit_bias_init: float | None = None  # a learned logit bias (SigLIP's loss: -10); None: no bias
    # A classification head over these classes (a fine-tuned model, `CLIP.classify`); empty: none.
    classnames: list[str] = field(default_factory=list)
    head_templates: list[str] = field(default_factory=list)  # the prompts its zero-shot start was built from
    decoder: DecoderConfig | None = None  # CoCa's captioning decoder (None: a contrastive model only)
    bag_of_words: BagOfWordsConfig | None = None  # a bag-of-n-grams head on the image embedding (None: none)
    # Text towers bound to this CLIP's frozen space (ImageBind), by modality name (e.g. "text-ko"): each its own
    # causal Transformer and tokenizer, trained against the image embeddings; image and text are untouched
    bound_text: dict[str, TextConfig] = field(default_factory=dict)
    bound_audio: dict[str, AudioConfig] = field(default_factory=dict)  # audio towers bound likewise (e.g. "audio")

    def __post_init__(self) -> None:
        if self.text_tower not in TEXT_TOWER_NAMES:
            raise ConfigError(f"text_tower must be 'clip' or 'minilm', got {self.text_tower!r}")
        if not all(isinstance(name, str) and name for name in self.classnames):
            raise ConfigError(f"classnames must be non-empty strings, got {self.classnames!r}")
        if len(set(self.classnames)) != len(self.classnames):
            raise ConfigError("classnames of a classification head must be distinct")
        if self.decoder is not None:
            self._check_decoder(self.decoder)
        if isinstance(self.bag_of_words, dict):  # from a JSON override
            self.bag_of_words = BagOfWordsConfig(**self.bag_of_words)
        self.bound_text = {name: TextConfig(**c) if isinstance(c, dict) else c for name, c in self.bound_text.items()}
        self.bound_audio = {name: AudioConfig(**c) if isinstance(c, dict) else c
                            for name, c in self.bound_audio.items()}
        for name in [*self.bound_text, *self.bound_audio]:
            check_modality_name(name)
        if set(self.bound_text) & set(self.bound_audio):
            raise ConfigError(f"bound tower names must differ: {sorted(set(self.bound_text) & set(self.bound_audio))}")
        if self.bag_of_words is not None and self.decoder is not None:
            raise ConfigError("bag_of_words and a captioning decoder are two predictive objectives: pick one")

    def _check_decoder(self, decoder: "DecoderConfig") -> None:
        """CoCa's shapes: the decoder reads the text tower's tokens and the attentional pool's image tokens."""
        if isinstance(decoder, dict):  # from a JSON override
            decoder = self.decoder = DecoderConfig(**decoder)
        # towers that give image tokens: CoCa's attentional pool, a class-token ViT's patches, a ResNet's attention pool
        tokens = self.vision.pool in ("attentional", "class") or self.vision.is_resnet
        if not tokens or self.text.pool not in ("cls", "eot") or not self.text.causal or self.text_tower != "clip":
            raise ConfigError("a captioning decoder needs image tokens (vision pool 'attentional' or 'class', or a "
                              "ResNet) and a causal text tower pooled at 'cls' (CoCa) or 'eot' (CLIP)")
        if decoder.vocab_size != self.text.vocab_size:
            raise ConfigError(f"CoCa: the decoder's vocabulary ({decoder.vocab_size}) must be the text tower's "
                              f"({self.text.vocab_size}): generated ids are fed back into it")
        if not decoder.width == self.text.width == self.embed_dim:
            raise ConfigError(f"CoCa: decoder width {decoder.width}, text width {self.text.width} and embed_dim "
                              f"{self.embed_dim} must be equal")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        d = dataclasses.asdict(self)
        for name in ("classnames", "head_templates"):  # absent without a head: files older readers still load
            if not d[name]:
                del d[name]
        for name in ("decoder", "bag_of_words"):
            if d[name] is None:
                del d[name]
        for name in ("bound_text", "bound_audio"):
            if not d[name]:
                del d[name]
        for tower, defaults in _TOWER_OPTIONS.items():  # likewise SigLIP's and CoCa's tower options at CLIP's values
            for name, value in defaults.items():
                if d[tower][name] == value:
                    del d[tower][name]
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """Build from `to_dict` output or a registry entry; unknown keys are an error."""
        d = dict(d)
        vision = _make(VisionConfig, d.pop("vision", {}), "vision")
        text = _make(TextConfig, d.pop("text", {}), "text")
        if d.get("decoder") is not None:
            d["decoder"] = _make(DecoderConfig, d["decoder"], "decoder")
        d["bound_text"] = {name: _make(TextConfig, c, f"bound_text.{name}") if isinstance(c, dict) else c
                           for name, c in (d.get("bound_text") or {}).items()}
        d["bound_audio"] = {name: _make(AudioConfig, c, f"bound_audio.{name}") if isinstance(c, dict) else c
                            for name, c in (d.get("bound_audio") or {}).items()}
        if d.get("bag_of_words") is not None:
            d["bag_of_words"] = _make(BagOfWordsConfig, d["bag_of_words"], "bag_of_words")
        d.pop("name", None)
        return _make(cls, {**d, "vision": vision, "text": text}, "top level")


BUILT_IN_MODALITIES = ("image", "text")
_MODALITY_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def check_modality_name(name: str) -> None:
    """A bound tower's name: lower-case words joined by '-' ("text-ko", "audio"), not a built-in modality."""
    if not isinstance(name, str) or not _MODALITY_NAME.match(name) or name in BUILT_IN_MODALITIES:
        raise ConfigError(f"bad modality name {name!r}: lower-case words joined by '-' (e.g. 'text-ko', 'audio'), "
                          f"not {' or '.join(BUILT_IN_MODALITIES)}")


def _make(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {where} config keys {sorted(unknown)}; known: {sorted(known)}")
    return kind(**values)


def apply_overrides(config: CLIPConfig, overrides: dict[str, Any]) -> CLIPConfig:
    """Return a copy with overrides applied; keys are top-level names or 'vision.x' / 'text.x'."""
    d = config.to_dict()
    for key, value in overrides.items():
        part, _, name = key.rpartition(".")
        if part in ("vision", "text"):
            d[part][name] = value
        elif not part and key in ("vision", "text") and isinstance(value, dict):
            d[key].update(value)
        elif not part:
            d[key] = value
        else:
            raise ConfigError(f"bad override key {key!r}: use 'embed_dim', 'vision.width', 'text.layers', ...")
    if "quick_gelu" in d:  # convenience: one switch for both towers
        q = d.pop("quick_gelu")
        d["vision"]["quick_gelu"] = d["text"]["quick_gelu"] = q
    return CLIPConfig.from_dict(d)


def list_models() -> list[str]:
    """Names of the architectures in the JSON registry."""
    files = resources.files(_ARCH_PACKAGE).joinpath(_ARCH_DIR).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def get_model_config(name: str) -> CLIPConfig:
    """Registry config by name; an unknown name lists the known ones."""
    path = resources.files(_ARCH_PACKAGE).joinpath(_ARCH_DIR, f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(list_models())}")
    return CLIPConfig.from_dict(json.loads(path.read_text()))


def list_audio_towers() -> list[str]:
    """Names of the audio tower shapes in the registry (architectures/audio/)."""
    files = resources.files(_ARCH_PACKAGE).joinpath(_ARCH_DIR, "audio").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def get_audio_config(name: str, **overrides: Any) -> AudioConfig:
    """A registry audio tower ("imagebind": ImageBind's shape; "cpu-small") with fields overridden."""
    path = resources.files(_ARCH_PACKAGE).joinpath(_ARCH_DIR, "audio", f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown audio tower {name!r}; known: {', '.join(list_audio_towers())}")
    return _make(AudioConfig, {**json.loads(path.read_text()), **overrides}, f"audio tower {name}")
