"""The frozen CLIP teacher: loaded from a local folder, penultimate layer, valid patches only."""

import pytest
import torch

from megatron_eve.config import ConfigError, replace
from megatron_eve.data.images import preprocess_image
from megatron_eve.model.teacher import CLIPTeacher
from tests.helpers import random_image, tiny_config


def test_patch_features_are_penultimate_valid_patches(teacher_path):
    from transformers import CLIPVisionModel

    cfg = tiny_config(teacher_path)
    teacher = CLIPTeacher(cfg.aligner, cfg.vision, "cpu", torch.float32)
    images = torch.stack([preprocess_image(random_image(w, h, i), cfg.vision)[1]
                          for i, (w, h) in enumerate([(200, 100), (112, 112)])])
    features = teacher.patch_features(images)
    full = CLIPVisionModel.from_pretrained(teacher_path).eval()
    with torch.no_grad():
        hidden = full(pixel_values=images[:, :3], output_hidden_states=True).hidden_states[-2][:, 1:]
    grid = cfg.vision.teacher_grid
    valid_rows_first = int(torch.nonzero(images[0, 3].amax(1))[0]) // 14
    rows = 4  # 200x100 at 112 px: v = ceil(112*100/200/14) = 4 patch rows
    expected_first = hidden[0].view(grid, grid, -1)[valid_rows_first : valid_rows_first + rows].reshape(-1, hidden.shape[-1])
    assert features.shape == (rows * grid + grid * grid, cfg.aligner.hidden_size)
    torch.testing.assert_close(features[: rows * grid], expected_first)
    torch.testing.assert_close(features[rows * grid :], hidden[1])
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_missing_teacher_folder(tmp_path):
    cfg = tiny_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="is not a local Hugging Face folder with a config.json"):
        CLIPTeacher(cfg.aligner, cfg.vision, "cpu", torch.float32)


def test_teacher_of_the_wrong_shape(teacher_path):
    cfg = replace(tiny_config(teacher_path), **{"aligner.hidden_size": 32})
    with pytest.raises(ConfigError, match="hidden_size is 64, model expects 32"):
        CLIPTeacher(cfg.aligner, cfg.vision, "cpu", torch.float32)
