"""EVE for Hugging Face transformers, shipped inside every folder exported by
checkpoint_conversion/megatron_to_hf.py and loaded through config.json's auto_map:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    pixels = model.process_images([Image.open("cat.jpg")])
    ids = model.generate(input_ids, images=pixels, max_new_tokens=64)   # <image> = id -200

Self-contained (torch, transformers, Pillow). The patch embedding layer follows the reference
implementation image by image; the aligner's weights load but are unused, and no CLIP teacher is
needed: it only serves training.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

IMAGE_TOKEN_INDEX = -200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EVEConfig(LlamaConfig):
    model_type = "eve"


def _to_rgb(image):
    """8-bit RGB as training and eval see it (megatron_eve.data.records.to_rgb, inlined: this file
    stands alone). convert("RGB") clips 16- and 32-bit integer pixels at 255, so those are scaled by
    the white level of their depth first: 65535 for I;16 or mode I holding 16-bit values, 255 for
    8-bit values, 2**31 - 1 beyond; negatives are black. Integer arithmetic, round half up, as there."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.array(image, dtype=np.int64)
        brightest = int(pixels.max()) if pixels.size else 0
        if image.mode.startswith("I;16") or 255 < brightest <= 65535:
            full_scale = 65535
        else:
            full_scale = 255 if brightest <= 255 else 2**31 - 1
        np.clip(pixels, 0, None, out=pixels)
        pixels *= 255
        pixels += full_scale // 2  # every full scale is odd: no tie, so this is round half up
        pixels //= full_scale
        image = Image.fromarray(pixels.astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("floating-point pixels (mode F) have no known range: convert the image to 8 bits first")
    return image.convert("RGB")


def _norm_linear(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out, bias=False))


class LocalAttention(nn.Module):
    def __init__(self, width: int, stride: int, heads: int):
        super().__init__()
        self.stride, self.heads, self.scale = stride, heads, width**-0.5
        self.q, self.kv, self.proj = _norm_linear(width, width), _norm_linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # [1, C, H, W] → [1, hw, C]
        s = self.stride
        reduced = F.avg_pool2d(grid, s, s)
        b, c, h, w = reduced.shape
        reduced = reduced.flatten(2).transpose(1, 2)
        q = self.q(reduced).reshape(b, h * w, self.heads, -1).permute(0, 2, 1, 3).unsqueeze(-2)
        pixels = grid.unfold(2, s, s).unfold(3, s, s).contiguous().view(b, c, h * w, s, s)
        kv = self.kv(pixels.flatten(3).permute(0, 2, 3, 1)).reshape(b, h * w, s * s, 2, self.heads, -1)
        kv = kv.permute(3, 0, 4, 1, 2, 5)
        attn = (q * self.scale * kv[0]).sum(-1).softmax(-1)
        merged = (attn.unsqueeze(-1) * kv[1]).sum(-2).transpose(1, 2).reshape(b, h * w, -1)
        return reduced + self.proj(merged)


class GlobalAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, width**-0.5
        self.q, self.kv, self.proj = _norm_linear(width, width), _norm_linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [1,1,C], [1,N,C] → [1,1,C]
        b, n, _ = tokens.shape
        q = self.q(cls).reshape(b, 1, self.heads, -1).transpose(1, 2)
        kv = self.kv(tokens).reshape(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale * kv[0]).sum(-1).softmax(-1)
        return cls + self.proj((attn.unsqueeze(-1) * kv[1]).sum(-2).reshape(b, 1, -1))


class VisionTokenizer(nn.Module):
    """EVE's patch embedding layer: 1 + h(w+1) tokens per image of any aspect ratio."""

    def __init__(self, config):
        super().__init__()
        width = config.mm_hidden_size
        self.patch, self.stride = config.patch_stride, config.conv_stride
        heads = getattr(config, "mm_vision_heads", 8)
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=self.patch, stride=self.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.split_embedding = nn.Parameter(torch.randn(width))
        self.local_attention = LocalAttention(width, self.stride, heads)
        self.global_attention = GlobalAttention(width, heads)

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        dtype = self.patch_embedding.weight.dtype
        grids = self.patch_embedding(images[:, :3].to(dtype))
        masks = F.avg_pool2d(images[:, 3:].float(), self.patch, self.patch)
        out = []
        for i in range(images.shape[0]):
            if masks[i, 0].sum() == 0:
                grid = grids[i, :, :16, :16]
            else:
                nz = torch.nonzero(masks[i, 0])
                (r1, c1), (r2, c2) = nz[0].tolist(), nz[-1].tolist()
                grid = grids[i, :, r1 : r2 + 1, c1 : c2 + 1]
            h, w = grid.shape[1] // self.stride, grid.shape[2] // self.stride
            merged = self.local_attention(grid.unsqueeze(0))
            cls = self.global_attention(self.class_embedding.view(1, 1, -1).to(dtype), merged)[0]
            rows = merged[0].transpose(0, 1).reshape(-1, h, w)
            split = self.split_embedding.view(-1, 1, 1).expand(-1, h, 1).to(dtype)
            out.append(torch.cat([cls, torch.cat([rows, split], dim=-1).flatten(1).transpose(0, 1)], dim=0))
        return out


class VisionCompressor(nn.Module):
    """The patch aligning layer's weights (training only; kept so exports round-trip exactly)."""

    def __init__(self, config):
        super().__init__()
        width, clip = config.hidden_size, getattr(config, "mm_hidden_size_clip", config.mm_hidden_size)
        taps = getattr(config, "mm_aligner_taps", config.num_hidden_layers // 4 + 1)
        self.norm_layer = nn.ModuleList([_norm_linear(width, clip) for _ in range(taps)])
        self.input_layer = nn.Linear(width, clip)
        self.output_layer = nn.Linear(clip, clip)


class EVELlamaModel(LlamaModel):
    config_class = EVEConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = VisionTokenizer(config)
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        if getattr(config, "requires_cliploss", False) and getattr(config, "mm_aligner_taps", 0):
            self.vision_tower_compressor = VisionCompressor(config)


class EVELlamaForCausalLM(LlamaForCausalLM):
    config_class = EVEConfig
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = EVELlamaModel(config)
        self.post_init()

    # --------------------------------------------------------------------------- images
    def process_images(self, images) -> torch.Tensor:
        """PIL images → [N, 4, S, S]: EVE's any-resolution resize, centred on a mean-colour square,
        CLIP-normalised, validity mask as channel 3. 16- and 32-bit integer images are scaled to 8
        bits by their depth, as in training (a float image is refused: its range is unknown)."""
        from PIL import Image

        cfg = self.config
        side, patch = cfg.image_size_clip, cfg.patch_stride
        ratio = cfg.image_size // side
        background = tuple(int(m * 255) for m in CLIP_MEAN)
        out = []
        for image in images:
            image = _to_rgb(image)
            width, height = image.size
            short = max(1, math.ceil(side * min(width, height) / max(width, height) / patch)) * patch
            pad = (side // patch - short // patch) // 2 * patch
            size = (side, short) if width > height else (short, side)
            resized = image.resize((size[0] * ratio, size[1] * ratio), Image.BICUBIC)
            square = Image.new("RGB", (side * ratio, side * ratio), background)
            offset = (0, pad * ratio) if width > height else (pad * ratio, 0)
            square.paste(resized, offset if width != height else (0, 0))
            mask = torch.zeros(1, side * ratio, side * ratio)
            if width > height:
                mask[:, pad * ratio : (pad + short) * ratio, :] = 1
            elif width < height:
                mask[:, :, pad * ratio : (pad + short) * ratio] = 1
            else:
                mask[:] = 1
            pixels = torch.from_numpy(np.array(square, dtype=np.float32))
            pixels = (pixels.permute(2, 0, 1) / 255.0 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
                CLIP_STD).view(3, 1, 1)
            out.append(torch.cat([pixels, mask]))
        return torch.stack(out)

    def embed_with_images(self, input_ids: torch.Tensor, images: torch.Tensor, left_pad: bool = False,
                          attention_mask: Optional[torch.Tensor] = None):
        """input_ids with one IMAGE_TOKEN_INDEX per image → (inputs_embeds, attention_mask), each
        placeholder replaced by its image's tokens; rows padded to the longest. Positions the given
        attention_mask hides (padding of a batch) are dropped first, as LLaVA / EVE do."""
        embed = self.get_input_embeddings()
        kept = [ids if attention_mask is None else ids[attention_mask[i].bool()] for i, ids in enumerate(input_ids)]
        placeholders = sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in kept)
        if placeholders > images.shape[0]:  # else an IndexError in the loop below
            raise ValueError(f"{placeholders} <image> placeholders for {images.shape[0]} images")
        features = [self.model.mm_projector(f) for f in self.model.vision_tower(images.to(embed.weight.device))]
        rows, image = [], 0
        for ids in kept:
            pieces, start = [], 0
            for pos in torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist():
                pieces += [embed(ids[start:pos]), features[image].to(embed.weight.dtype)]
                image, start = image + 1, pos + 1
            pieces.append(embed(ids[start:]))
            rows.append(torch.cat(pieces))
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for i, row in enumerate(rows):
            span = slice(length - row.shape[0], length) if left_pad else slice(0, row.shape[0])
            embeds[i, span], mask[i, span] = row, 1
        return embeds, mask

    def forward(self, input_ids=None, images=None, inputs_embeds=None, attention_mask=None, **kwargs):
        if images is not None and input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            inputs_embeds, attention_mask = self.embed_with_images(input_ids, images, attention_mask=attention_mask)
            input_ids = None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, inputs=None, images=None, **kwargs):
        if inputs is None and images is not None:  # generate(input_ids=..., images=...), as transformers takes it
            inputs = kwargs.pop("input_ids", None)
        if images is not None and inputs is not None:
            embeds, mask = self.embed_with_images(inputs, images, left_pad=True,
                                                  attention_mask=kwargs.pop("attention_mask", None))
            return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return super().generate(inputs, **kwargs)
