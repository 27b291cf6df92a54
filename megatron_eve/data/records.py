"""One LLaVA-format record → one stored sample (tokens, labels, encoded image views), or a
rejection with a reason. Pure per-record work, run in preprocessing worker processes.

Images are stored already resized the EVE way (eve.md §3) and cropped to their valid region:
the PEL view (long side = image_size) and the teacher view (long side = teacher_image_size), each
encoded as JPEG (default, quality 95, 4:4:4) or PNG (lossless). The padded squares and masks are
rebuilt on the device from the crop sizes, so neither padding nor masks are stored.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from megatron_eve.config import VisionConfig
from megatron_eve.data.images import image_layout, teacher_layout, tokens_per_image
from megatron_eve.data.templates import IMAGE_PLACEHOLDER, TemplateError, apply_template
from megatron_eve.data.tokenizer import Tokenizer
from megatron_eve.model.visual_layout import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class RecordConfig:
    template: str
    vision: VisionConfig
    image_folder: str = ""
    max_length: int = 4096  # expanded length: text + 1 + h(w+1) per image
    over_length: str = "drop"  # or "truncate"
    max_images: int = 1  # EVE trains with one image per sample
    image_codec: str = "jpeg"  # or "png"
    jpeg_quality: int = 95
    # Image paths must stay inside image_folder (no absolute paths, no "..") unless this is set.
    allow_images_outside_folder: bool = False


@dataclass
class Sample:
    id: str
    tokens: np.ndarray  # int32, expanded: IMAGE_TOKEN_INDEX on every visual position
    labels: np.ndarray  # int32, aligned with tokens (unshifted), IGNORE_INDEX where no loss
    images: List[bytes] = field(default_factory=list)  # PEL-view crops, encoded
    teacher_images: List[bytes] = field(default_factory=list)  # teacher-view crops, encoded


@dataclass
class Rejection:
    id: str
    reason: str
    detail: str


def record_id(record: Any, index: int) -> str:
    if isinstance(record, dict) and record.get("id") is not None:
        try:
            return str(record["id"])
        except RecursionError:  # an id nested as deep as the decoder allows
            pass
    return f"#{index}"


def _check_id(sample_id: str) -> None:
    """The id is stored as UTF-8: a lone surrogate (a JSON escape such as \\ud800 without its
    pair) has no UTF-8 form."""
    try:
        sample_id.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TemplateError("invalid_id", f"the id {ascii(sample_id)[:200]} is not valid Unicode "
                            f"({error.reason})") from None


def _image_paths(record: Dict) -> List[str]:
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return image
    raise TemplateError("malformed_record", f"'image' must be a path or a list of paths, got {type(image).__name__}")


def _resolve_image(folder: str, path: str, allow_outside: bool) -> str:
    """The file a record's image path names. With an image folder, a path that leaves it (an
    absolute path, or ".." above it) is refused: data files must not reach elsewhere on disk."""
    if not folder or allow_outside:
        return os.path.join(folder, path)
    if os.path.isabs(path):
        raise TemplateError("image_outside_folder", f"{path}: absolute image path; images must be inside "
                            f"--image-folder (or pass --allow-images-outside-folder)")
    root = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise TemplateError("image_outside_folder", f"{path}: leaves --image-folder (or pass "
                            "--allow-images-outside-folder)")
    return full


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise TemplateError("missing_image", f"no file at {path}")
    try:
        with warnings.catch_warnings():
            # The reference opens what Pillow opens: up to twice MAX_IMAGE_PIXELS (a 108 MP photo
            # only warns); beyond, Pillow's DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()  # decodes now: truncated files fail here, not later in a loader
        return to_rgb(image, path)
    except TemplateError:
        raise
    except UnidentifiedImageError as error:
        raise TemplateError("corrupt_image", f"{path}: not a readable image ({error})") from None
    except Image.DecompressionBombError as error:
        raise TemplateError("image_too_large", f"{path}: {error}") from None
    except OSError as error:
        reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
        raise TemplateError(reason, f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 — Pillow raises SyntaxError, ValueError, ... on damaged files
        raise TemplateError("corrupt_image", f"{path}: {type(error).__name__}: {error}") from None


def _integer_full_scale(mode: str, brightest: int) -> int:
    """The white level of integer grey pixels. I;16 is 16-bit. Mode I (signed 32-bit) also holds
    8- and 16-bit data (Pillow reads 16-bit PNGs as I): its values say which, and beyond 16 bits
    white is the type's largest value, 2**31 - 1 (as scikit-image's img_as_ubyte scales int32;
    negative values become black)."""
    if mode.startswith("I;16") or 255 < brightest <= 65535:
        return 65535
    return 255 if brightest <= 255 else 2**31 - 1


def to_rgb(image, path: str = "image"):
    """8-bit RGB as EVE sees it. Pillow's convert("RGB") clips 16- and 32-bit integer pixels at 255
    (a 16-bit grey image turns white): those are scaled to 8 bits first, by the white level of their
    depth (_integer_full_scale); float pixels, whose range is unknown, are refused."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        # In place, in integers (round half up, no tie can occur): a float copy per step took 5x the
        # memory of the 8-bit result's source.
        pixels = np.array(image, dtype=np.int64)
        full_scale = _integer_full_scale(image.mode, int(pixels.max()) if pixels.size else 0)
        np.clip(pixels, 0, None, out=pixels)
        pixels *= 255
        pixels += full_scale // 2
        pixels //= full_scale
        image = Image.fromarray(pixels.astype(np.uint8), "L")
    elif image.mode == "F":
        raise TemplateError("unsupported_image", f"{path}: floating-point pixels (mode F) have no known range")
    return image.convert("RGB")


def _crop(image, layout):
    """The resized image exactly as EVE pastes it (PIL bicubic), without the padding. Its pixels
    only: the source's metadata would be stored with every crop, and some is made afresh by each
    run (LAB -> RGB attaches an ICC profile stamped with the clock), so the same input would not
    give the same bytes."""
    from PIL import Image

    crop = image.resize((layout.width, layout.height), Image.BICUBIC)
    crop.info = {}
    return crop


def encode_image(image, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if codec == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif codec == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unknown image codec {codec!r}: choose jpeg or png")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded crop → uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))  # writable: becomes a torch tensor without a warning


def _expand(tokens: List[int], labels: List[int], counts: List[int]) -> Tuple[List[int], List[int]]:
    """Each IMAGE_TOKEN_INDEX placeholder → a run of that image's token count (labels ignored)."""
    out_tokens, out_labels, image = [], [], 0
    for token, label in zip(tokens, labels):
        if token == IMAGE_TOKEN_INDEX:
            out_tokens += [IMAGE_TOKEN_INDEX] * counts[image]
            out_labels += [IGNORE_INDEX] * counts[image]
            image += 1
        else:
            out_tokens.append(token)
            out_labels.append(label)
    return out_tokens, out_labels


def _truncate(tokens: List[int], labels: List[int], counts: List[int], limit: int):
    """Cut to `limit` positions without splitting an image run; images cut off are dropped."""
    kept_images, position, image = 0, 0, 0
    cut = limit
    while position < min(limit, len(tokens)):
        if tokens[position] == IMAGE_TOKEN_INDEX:
            if position + counts[image] > limit:
                cut = position
                break
            position += counts[image]
            image += 1
            kept_images = image
        else:
            position += 1
    return tokens[:cut], labels[:cut], kept_images


def process_record(record: Any, index: int, config: RecordConfig, tokenizer: Tokenizer) -> Union[Sample, Rejection]:
    sample_id = record_id(record, index)
    try:
        _check_id(sample_id)
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise TemplateError("malformed_record", "a record needs a 'conversations' list")
        paths = _image_paths(record)
        if len(paths) > config.max_images:
            raise TemplateError("too_many_images", f"{len(paths)} images; at most {config.max_images} per sample")
        placeholders = sum(
            t.get("value", "").count(IMAGE_PLACEHOLDER) for t in record["conversations"] if isinstance(t, dict)
            and isinstance(t.get("value"), str)
        )
        if placeholders != len(paths):
            raise TemplateError(
                "image_token_mismatch", f"{placeholders} <image> placeholders for {len(paths)} images"
            )
        tokenized = apply_template(config.template, record["conversations"], tokenizer, len(paths))
        # A leading gpt turn is dropped by the template, <image> and all, as the reference drops it:
        # its image (the first ones) then has no position and goes unused there; the text trains.
        paths = paths[len(paths) - tokenized.tokens.count(IMAGE_TOKEN_INDEX):]

        vision = config.vision
        images = [_open_image(_resolve_image(config.image_folder, p, config.allow_images_outside_folder))
                  for p in paths]
        layouts = [image_layout(*im.size, vision) for im in images]
        counts = [tokens_per_image(lay.height // vision.token_cell, lay.width // vision.token_cell) for lay in layouts]
        tokens, labels = _expand(tokenized.tokens, tokenized.labels, counts)
        if len(tokens) > config.max_length:
            if config.over_length != "truncate":
                raise TemplateError("too_long", f"{len(tokens)} positions > max length {config.max_length}")
            tokens, labels, kept = _truncate(tokens, labels, counts, config.max_length)
            images, layouts = images[:kept], layouts[:kept]
        if not any(label >= 0 for label in labels):
            raise TemplateError("no_supervised_tokens", "no token carries loss (its LM loss would be NaN)")
        sample = Sample(sample_id, np.asarray(tokens, dtype=np.int32), np.asarray(labels, dtype=np.int32))
        for image, layout in zip(images, layouts):
            base = teacher_layout(*image.size, vision)
            sample.images.append(encode_image(_crop(image, layout), config.image_codec, config.jpeg_quality))
            sample.teacher_images.append(encode_image(_crop(image, base), config.image_codec, config.jpeg_quality))
        return sample
    except TemplateError as error:
        # An id that cannot be written (invalid_id) is named by the record's position instead.
        return Rejection(sample_id if error.reason != "invalid_id" else f"#{index}", error.reason, str(error))
