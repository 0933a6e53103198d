"""The one audio decode policy and the log-mel front end of bound audio towers (ImageBind).

Every audio file clipforge opens (binding, evaluation, search, serving) goes through `decode_audio`: libsndfile
(through `soundfile`) decodes WAV, FLAC, Ogg Vorbis/Opus, ...; channels are averaged to mono and the signal is
resampled to the tower's rate (scipy's polyphase filter). A file that cannot be used raises `SampleError` with one
of AUDIO_ERROR_REASONS, so jobs skip and count it the way they count bad images.

The front end is Kaldi's filter bank (what ImageBind and AST compute with torchaudio): 25 ms Hann frames every 10 ms,
only whole frames, DC removed and pre-emphasis 0.97 per frame, the power spectrum of the frame padded to a power of
two (512 points at 16 kHz), triangular filters
evenly spaced on the mel scale 1127 ln(1 + f/700) from 20 Hz to Nyquist, natural log floored at float32's epsilon.
"""
from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Sequence, Union

import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly

from clipforge.errors import SampleError
from clipforge.model.config import AudioConfig

PathLike = Union[str, "os.PathLike[str]"]

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif")
AUDIO_SUFFIXES = frozenset(f".{e}" for e in AUDIO_EXTENSIONS)
# missing_file / empty_file as for images; the rest are audio's own.
AUDIO_ERROR_REASONS = ("missing_file", "empty_file", "not_audio", "corrupt_audio", "truncated_audio", "empty_audio",
                       "too_long")
DEFAULT_MAX_SECONDS = 600.0  # longer files are refused from the header, before decoding (an absurd length)
# Decoded samples (all channels) a file may hold: 256 MB as float32; a tiny file of many channels at an absurd rate
# is refused from its header too
MAX_DECODED_SAMPLES = 64_000_000
_PREEMPHASIS = 0.97
_LOG_FLOOR = float(np.finfo(np.float32).eps)


def _open(source: PathLike | bytes | IO[bytes], name: str) -> tuple[soundfile.SoundFile, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise SampleError("empty_file", name or "<bytes>")
        source, name = io.BytesIO(source), name or "<bytes>"
    elif not hasattr(source, "read"):
        path = name = os.fspath(source)
        if not os.path.isfile(path):
            raise SampleError("missing_file", path)
        if os.path.getsize(path) == 0:
            raise SampleError("empty_file", path)
    try:
        return soundfile.SoundFile(source), name or "<stream>"
    except soundfile.LibsndfileError as error:
        unknown = "not recognised" in str(error)
        raise SampleError("not_audio" if unknown else "corrupt_audio", f"{name}: {error.error_string}") from None
    except (RuntimeError, TypeError, ValueError) as error:
        raise SampleError("not_audio", f"{name}: {error}") from None


def decode_audio(source: PathLike | bytes | IO[bytes], sample_rate: int, max_seconds: float = DEFAULT_MAX_SECONDS,
                 name: str = "") -> np.ndarray:
    """Decode a whole file (path, bytes or stream) to mono float32 at `sample_rate`, or raise SampleError."""
    sound, name = _open(source, name)
    with sound:
        if sound.samplerate <= 0 or sound.channels <= 0:
            raise SampleError("corrupt_audio", f"{name}: {sound.samplerate} Hz, {sound.channels} channels")
        if sound.frames > max_seconds * sound.samplerate:
            raise SampleError("too_long", f"{name}: {sound.frames / sound.samplerate:.0f} s > {max_seconds:g} s")
        if sound.frames * sound.channels > MAX_DECODED_SAMPLES:
            raise SampleError("too_long", f"{name}: {sound.frames} frames x {sound.channels} channels decode to more "
                              f"than {MAX_DECODED_SAMPLES} samples")
        try:
            samples = sound.read(dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as error:
            raise SampleError("truncated_audio", f"{name}: decoding stopped: {error.error_string}") from None
        declared, rate = sound.frames, sound.samplerate
    if len(samples) == 0:
        # An Ogg stream cut before its end also lands here: libsndfile then finds no length to decode.
        raise SampleError("empty_audio", f"{name}: no samples (an empty recording, or a stream cut short)")
    if len(samples) < declared:
        raise SampleError("truncated_audio", f"{name}: {len(samples)} of {declared} samples")
    if not np.isfinite(samples).all():
        raise SampleError("corrupt_audio", f"{name}: samples that are not finite numbers")
    return resample(samples.mean(axis=1), rate, sample_rate)


def resample(signal: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`signal` at `target` Hz (polyphase filtering; unchanged when the rates agree)."""
    if rate == target:
        return np.ascontiguousarray(signal, dtype=np.float32)
    step = math.gcd(rate, target)
    return resample_poly(signal, target // step, rate // step).astype(np.float32)


def fit_length(signal: np.ndarray, samples: int, rng: random.Random | None = None) -> np.ndarray:
    """Exactly `samples` samples: a crop (centred, or drawn from `rng`) of a longer signal, silence after a shorter."""
    if len(signal) >= samples:
        start = (len(signal) - samples) // 2 if rng is None else rng.randrange(len(signal) - samples + 1)
        return signal[start:start + samples]
    return np.pad(signal, (0, samples - len(signal)))


def fft_size(frame_length: int) -> int:
    """Kaldi's FFT size: the frame padded to the next power of two (512 for 25 ms at 16 kHz)."""
    return 1 << (frame_length - 1).bit_length()


@lru_cache(maxsize=8)
def mel_filters(sample_rate: int, mel_bins: int, fft: int = 512, low_hz: float = 20.0) -> torch.Tensor:
    """Kaldi's triangular mel filters [fft // 2 + 1, mel_bins] (float64; the Nyquist bin gets no weight)."""
    def mel(hz: torch.Tensor | float) -> torch.Tensor:
        return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)

    bins = fft // 2
    freqs = mel(torch.arange(bins, dtype=torch.float64) * sample_rate / fft)
    low, high = mel(low_hz), mel(sample_rate / 2)
    delta = (high - low) / (mel_bins + 1)
    left = low + delta * torch.arange(mel_bins, dtype=torch.float64)
    centre, right = left + delta, left + 2 * delta
    rising = (freqs[:, None] - left) / (centre - left)
    falling = (right - freqs[:, None]) / (right - centre)
    weights = torch.minimum(rising, falling).clamp(min=0)
    return torch.cat([weights, torch.zeros(1, mel_bins, dtype=torch.float64)])  # the Nyquist row


def log_mel(signal: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """Kaldi filter-bank features [..., mel_bins, frames] of waveforms [..., samples] at the config's rate."""
    frames = signal.double().unfold(-1, config.frame_length, config.hop_length)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    frames = torch.cat([frames[..., :1] * (1 - _PREEMPHASIS),
                        frames[..., 1:] - _PREEMPHASIS * frames[..., :-1]], dim=-1)
    window = torch.hann_window(config.frame_length, periodic=False, dtype=torch.float64)
    fft = fft_size(config.frame_length)
    power = torch.fft.rfft(frames * window, n=fft).abs().pow(2)
    mel = power @ mel_filters(config.sample_rate, config.mel_bins, fft)
    return mel.clamp(min=_LOG_FLOOR).log().transpose(-1, -2).float()


@dataclass(frozen=True)
class SpecAugment:
    """Training masks on the normalised spectrogram (SpecAugment): bands of mel bins and of frames set to 0."""

    freq_masks: int = 1
    freq_width: int = 16  # each band at most this many mel bins
    time_masks: int = 1
    time_width: int = 20  # each band at most this many frames

    def __call__(self, mel: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """`mel` [1, bins, frames] with the masks drawn from `rng` applied (a copy)."""
        mel = mel.clone()
        for axis, count, width in ((-2, self.freq_masks, self.freq_width), (-1, self.time_masks, self.time_width)):
            size = mel.shape[axis]
            for _ in range(count):
                span = rng.randint(0, min(width, size))
                start = rng.randrange(size - span + 1)
                mel.narrow(axis, start, span).zero_()
        return mel


@dataclass(frozen=True)
class AudioPreprocess:
    """One audio input (path, bytes or stream) -> its normalised log-mel [1, mel_bins, frames]: a batch is a stack.

    Evaluation takes the clip's centre; training (`augment`) a random crop and SpecAugment masks, drawn from the
    sample's own `rng` so a resumed run sees the same batches."""

    config: AudioConfig
    augment: SpecAugment | None = None
    max_seconds: float = DEFAULT_MAX_SECONDS
    takes_rng = True  # the data pipeline hands it the sample's random draws

    def __call__(self, source: PathLike | bytes | IO[bytes] | Sequence[PathLike],
                 rng: random.Random | None = None) -> torch.Tensor:
        """[1, bins, frames] for one input; [N, 1, bins, frames] for a list of paths (the pipeline's call)."""
        if isinstance(source, (list, tuple)):
            return torch.stack([self(item, rng) for item in source])
        signal = decode_audio(source, self.config.sample_rate, self.max_seconds)
        crop_rng = rng if self.augment is not None else None
        clip = torch.from_numpy(fit_length(signal, self.config.samples, crop_rng).copy())
        mel = (log_mel(clip, self.config) - self.config.mel_mean) / self.config.mel_std
        mel = mel.unsqueeze(0)
        return self.augment(mel, rng or random.Random(0)) if self.augment is not None else mel


@dataclass(frozen=True)
class AudioColumn:
    """A pairs table's audio column for the training pipeline: its cells (paths relative to the table's folder, or
    absolute) -> a batch of log-mel clips; a bad file raises SampleError, so the sample is skipped and counted."""

    preprocess: AudioPreprocess
    folder: Path
    takes_rng = True

    def __call__(self, cells: Sequence[str], rng: random.Random | None = None) -> torch.Tensor:
        """[N, 1, mel_bins, frames] for the cells."""
        return self.preprocess([self.folder / cell for cell in cells], rng)
