"""Uploads: images decoded by clipforge's one image policy (data.images), recordings by its audio policy
(data.audio, through a bound audio tower's preprocess); both read within the size limit."""
from __future__ import annotations

from typing import Callable

import anyio
import torch
from fastapi import HTTPException, UploadFile
from PIL import Image

from clipforge.data.images import SampleError, decode_image

# The shared decode policy's reasons, as HTTP statuses (README "Serve" and the OpenAPI spec list them).
_UPLOAD_STATUS = {"empty_file": 400, "too_many_pixels": 413}


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image with clipforge's one image policy, or raise a 4xx HTTPException saying why not."""
    try:
        return decode_image(data, max_pixels, name="the upload")
    except SampleError as error:
        status = _UPLOAD_STATUS.get(error.reason, 415)
        message = {400: "the upload is empty", 413: f"the image is over {max_pixels} pixels ({error.detail})"}
        unreadable = f"the upload is not a readable image ({error.detail})"
        raise HTTPException(status, message.get(status, unreadable)) from None


async def read_upload(file: UploadFile, max_bytes: int, max_pixels: int) -> Image.Image:
    """The uploaded image, decoded off the event loop; 413 over `max_bytes`, else decode_upload's errors."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload too large: the limit is {max_bytes} bytes")
    return await anyio.to_thread.run_sync(decode_upload, data, max_pixels)


# The audio policy's reasons (data.audio), as HTTP statuses: an unusable recording is 415.
_AUDIO_STATUS = {"empty_file": 400, "too_long": 413}


def decode_audio_upload(data: bytes, preprocess: Callable[..., torch.Tensor]) -> torch.Tensor:
    """An uploaded recording through a bound audio tower's preprocess (its log-mel clip), or a 4xx HTTPException."""
    try:
        return preprocess(data)
    except SampleError as error:
        status = _AUDIO_STATUS.get(error.reason, 415)
        message = {400: "the upload is empty", 413: f"the recording is too long ({error.detail})"}
        unreadable = f"the upload is not a usable recording ({error.reason}: {error.detail})"
        raise HTTPException(status, message.get(status, unreadable)) from None


async def read_audio_upload(file: UploadFile, max_bytes: int, preprocess: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The uploaded recording's log-mel clip, decoded off the event loop; 413 over `max_bytes`."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload too large: the limit is {max_bytes} bytes")
    return await anyio.to_thread.run_sync(decode_audio_upload, data, preprocess)
