"""The audio front end of bound audio towers: the decode policy (mono, resampling, every bad kind refused with its
reason), fixed-length clips, Kaldi's log-mel filter bank against transformers' reference, SpecAugment."""
from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import soundfile
import torch

from clipforge.data import audio as audio_module
from clipforge.data.audio import AudioPreprocess, SpecAugment, decode_audio, fit_length, log_mel
from clipforge.errors import SampleError
from clipforge.model.config import AudioConfig, get_audio_config, list_audio_towers


def _tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A chirp with a little noise (every mel band gets energy), [samples, channels]."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    noise = 0.01 * np.random.default_rng(seed).standard_normal((len(t), channels))
    return (chirp[:, None] + noise).astype(np.float32)


def _encoded(samples: np.ndarray, rate: int, format: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format)
    return buffer.getvalue()


@pytest.mark.parity
@pytest.mark.parametrize("rate", [16000, 44100])
def test_log_mel_matches_the_kaldi_filter_bank_of_transformers(rate):
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    config = AudioConfig(clip_seconds=1.0)
    signal = decode_audio(_encoded(_tone(1.3, rate), rate, "WAV"), 16000)
    with pytest.warns(UserWarning, match="all zero values"):  # the lowest filters are narrower than an FFT bin
        filters = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20, max_frequency=8000,
                                  sampling_rate=16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    reference = spectrogram(signal.astype(np.float64), window_function(400, "hann", periodic=False),
                            frame_length=400, hop_length=160, fft_length=512, power=2.0, center=False,
                            preemphasis=0.97, mel_filters=filters, log_mel="log", mel_floor=1.192092955078125e-07,
                            remove_dc_offset=True, dtype=np.float64)
    ours = log_mel(torch.from_numpy(signal), config).numpy()
    assert ours.shape == reference.shape == (128, 1 + (len(signal) - 400) // 160)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_decoding_averages_channels_and_resamples():
    stereo = _tone(1.0, 44100, channels=2)
    decoded = decode_audio(_encoded(stereo, 44100, "FLAC"), 16000)
    assert decoded.dtype == np.float32 and decoded.shape == (16000,)
    same_rate = decode_audio(_encoded(stereo, 16000, "WAV"), 16000)
    np.testing.assert_allclose(same_rate, stereo.mean(axis=1), atol=1e-4)  # 16-bit WAV rounding


def test_fixed_length_clips_crop_or_pad():
    signal = np.arange(10, dtype=np.float32)
    assert fit_length(signal, 4).tolist() == [3, 4, 5, 6]  # evaluation: the centre
    drawn = fit_length(signal, 4, random.Random(1))
    assert drawn.tolist() == list(range(int(drawn[0]), int(drawn[0]) + 4))
    assert fit_length(signal[:3], 5).tolist() == [0, 1, 2, 0, 0]  # silence after


@pytest.mark.parametrize("reason, make", [
    ("missing_file", lambda tmp: tmp / "absent.wav"),
    ("empty_file", lambda tmp: b""),
    ("not_audio", lambda tmp: b"this is a text file, not a recording\n" * 20),
    ("truncated_audio", lambda tmp: (lambda b: b[:len(b) // 2])(_encoded(_tone(1.0, 16000), 16000, "FLAC"))),
    ("empty_audio", lambda tmp: _encoded(np.zeros((0, 1), np.float32), 16000, "WAV")),
    ("empty_audio", lambda tmp: (lambda b: b[:len(b) // 2])(_encoded(_tone(2.0, 16000), 16000, "OGG"))),
    ("too_long", lambda tmp: _encoded(_tone(3.0, 8000), 8000, "WAV")),
    ("corrupt_audio", lambda tmp: _encoded(_tone(1.0, 16000), 16000, "OGG")[:200]),  # a header cut short
])
def test_every_bad_audio_kind_is_refused_with_its_reason(tmp_path, reason, make):
    source = make(tmp_path)
    with pytest.raises(SampleError) as caught:
        decode_audio(source, 16000, max_seconds=2.0)
    assert caught.value.reason == reason


def test_preprocess_gives_a_fixed_shape_and_training_draws_repeat():
    config = AudioConfig(clip_seconds=0.5, mel_bins=32)
    data = _encoded(_tone(1.2, 22050), 22050, "WAV")
    evaluation = AudioPreprocess(config)
    mel = evaluation(data)
    assert mel.shape == (1, 32, config.frames) and torch.equal(mel, evaluation(data))
    training = AudioPreprocess(config, augment=SpecAugment(freq_masks=2, freq_width=8, time_masks=2, time_width=10))
    first, again = training(data, random.Random(5)), training(data, random.Random(5))
    assert torch.equal(first, again) and not torch.equal(first, training(data, random.Random(6)))
    assert (first == 0).any() and first.shape == mel.shape
    silent = AudioPreprocess(config)(_encoded(np.zeros((8000, 1), np.float32), 16000, "WAV"))
    expected = (np.log(np.finfo(np.float32).eps) - config.mel_mean) / config.mel_std
    assert torch.allclose(silent, torch.full_like(silent, expected))  # silence sits at the log floor


def test_the_registry_holds_imagebinds_audio_shape():
    assert {"imagebind", "cpu-small"} <= set(list_audio_towers())
    imagebind = get_audio_config("imagebind")
    assert (imagebind.mel_bins, imagebind.frames, imagebind.grid, imagebind.width) == (128, 198, (12, 19), 768)
    assert get_audio_config("cpu-small", layers=2).layers == 2
    with pytest.raises(Exception, match="unknown audio tower"):
        get_audio_config("whisper")


@pytest.mark.parity
def test_log_mel_pads_long_frames_to_the_next_power_of_two():
    """At 48 kHz a 25 ms frame is 1,200 samples: Kaldi's FFT is 2,048 points, never a truncating 512."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    config = AudioConfig(sample_rate=48000, clip_seconds=0.5, mel_bins=64)
    signal = _tone(0.5, 48000)[:, 0].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the lowest filters are narrower than an FFT bin
        filters = mel_filter_bank(num_frequency_bins=1025, num_mel_filters=64, min_frequency=20, max_frequency=24000,
                                  sampling_rate=48000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    reference = spectrogram(signal, window_function(1200, "hann", periodic=False), frame_length=1200, hop_length=480,
                            fft_length=2048, power=2.0, center=False, preemphasis=0.97, mel_filters=filters,
                            log_mel="log", mel_floor=1.192092955078125e-07, remove_dc_offset=True, dtype=np.float64)
    np.testing.assert_allclose(log_mel(torch.from_numpy(signal), config).numpy(), reference, atol=1e-4, rtol=0)


def test_a_file_that_decodes_to_too_many_samples_is_refused_from_its_header(monkeypatch):
    monkeypatch.setattr(audio_module, "MAX_DECODED_SAMPLES", 20000)
    wide = _encoded(_tone(0.5, 16000, channels=4), 16000, "WAV")  # 0.5 s, but 4 channels x 8,000 frames
    with pytest.raises(SampleError) as caught:
        decode_audio(wide, 16000)
    assert caught.value.reason == "too_long" and "4 channels" in caught.value.detail
    assert decode_audio(_encoded(_tone(0.5, 16000), 16000, "WAV"), 16000).shape == (8000,)
