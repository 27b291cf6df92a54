"""checkpoint_conversion/: HF EVE ↔ megatron at TP=2 and PP=2 bit-exact, logits of the export under
plain transformers equal the megatron model's, Llama / Vicuna initialisation, bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_eve.checkpoint.hf_eve import HFWeights
from tests.helpers import ROOT, read_json, torchrun
from tests.hf_fixtures import release_like_eve, tiny_hf_eve

CONVERT = ROOT / "checkpoint_conversion"


def convert(script, *args):
    out = subprocess.run([sys.executable, str(CONVERT / script), *map(str, args)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return out


def ok(out):
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def model_tensors(folder):
    weights = HFWeights(str(folder))
    return {k: weights.get(k) for k in weights.keys() if "vision_clip" not in k and "clip_layer" not in k}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random EVE laid out like the release, converted to megatron once."""
    root = tmp_path_factory.mktemp("conversion")
    tiny_hf_eve(str(root / "hf"), fmt="bin")
    ok(convert("hf_to_megatron.py", "--hf", root / "hf", "--out", root / "megatron", "--dtype", "float32",
               "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2))
    return root


@pytest.mark.parametrize("layout, fmt", [(["--tp", "2"], "bin"), (["--pp", "2"], "safetensors")])
def test_round_trip_through_another_layout_is_bit_exact(release, tmp_path, layout, fmt):
    """HF → megatron → loaded and saved at TP=2 (or PP=2) by the real model → HF: every tensor
    identical, the teacher's keys skipped."""
    torchrun("conversion_worker.py", 2, ["relayout", "--src", release / "megatron", "--dst", tmp_path / "relaid", *layout])
    ok(convert("megatron_to_hf.py", "--megatron", tmp_path / "relaid", "--out", tmp_path / "hf", "--dtype", "float32",
               "--format", fmt, "--max-shard-size-gb", "0.002", "--no-progress"))
    original, exported = model_tensors(release / "hf"), model_tensors(tmp_path / "hf")
    assert set(original) == set(exported) and len(original) > 100
    assert all(torch.equal(original[k], exported[k]) for k in original)
    names = os.listdir(tmp_path / "hf")
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    assert index in names and "modeling_eve.py" in names and "config.json" in names
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == "eve" and config["architectures"] == ["EVELlamaForCausalLM"]
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_eve.EVELlamaForCausalLM"


@pytest.fixture(scope="module")
def logits(release, tmp_path_factory, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("logits")
    ok(convert("megatron_to_hf.py", "--megatron", release / "megatron", "--out", root / "export", "--dtype", "float32",
               "--tokenizer-model", corpus["tokenizer"], "--no-progress"))
    lm = tiny_config().language
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )).save_pretrained(root / "llama")
    ok(convert("llama_to_megatron.py", "--hf", root / "llama", "--preset", "tiny", "--out", root / "llama_megatron",
               "--dtype", "float32"))
    torchrun("conversion_worker.py", 1, ["logits", "--megatron", release / "megatron", "--hf", root / "export",
                                         "--out", root / "logits.json", "--llama-hf", root / "llama",
                                         "--llama-megatron", root / "llama_megatron"])
    return read_json(root / "logits.json") | {"root": str(root)}


def test_export_loads_in_plain_transformers_with_equal_logits(logits):
    """fp32: |Δlogit| ≤ 1e-4 on logits of scale ~2 (measured ~2e-6), text only and with an image."""
    assert logits["hf_class"] == "EVELlamaForCausalLM"
    assert logits["text_max_abs_diff"] <= 1e-4
    assert logits["image_shapes"][0] == logits["image_shapes"][1]
    assert logits["image_max_abs_diff"] <= 1e-4 and logits["logit_scale"] > 0.5
    assert logits["process_images_max_abs_diff"] == 0.0  # the export's own image processing
    assert logits["generated_shape"] == [1, 4]  # generate() with an image


def test_export_carries_the_tokenizer(logits):
    names = os.listdir(os.path.join(logits["root"], "export"))
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= set(names)


def test_llama_initialisation_matches_llama_for_causal_lm(logits):
    """The language model of a converted Vicuna/Llama (GQA here) equals LlamaForCausalLM (fp32)."""
    assert logits["llama_max_abs_diff"] <= 1e-4  # loading also checked PEL and projector were written


def test_a_llama_folder_is_pointed_at_its_converter(logits, tmp_path):
    out = convert("hf_to_megatron.py", "--hf", os.path.join(logits["root"], "llama"), "--out", tmp_path / "m")
    assert out.returncode == 1 and "holds no EVE vision weights" in out.stderr
    assert "checkpoint_conversion/llama_to_megatron.py" in out.stderr and not (tmp_path / "m").exists()


def test_missing_shard(tmp_path):
    tiny_hf_eve(str(tmp_path / "hf"), fmt="bin")
    os.remove(tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    assert out.returncode == 1 and "shards named in pytorch_model.bin.index.json are missing: " \
                                   "pytorch_model-00002-of-00002.bin" in out.stderr


def test_wrong_shapes_and_unknown_or_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_eve(str(tmp_path / "hf"), fmt="safetensors", with_teacher_keys=False)
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    state["model.layers.3.mlp.up_proj.weight"] = torch.zeros(7, 128)
    save_file(state, path)
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    assert out.returncode == 1 and "model.layers.3.mlp.up_proj.weight is [7, 128], expected [352, 128]" in out.stderr

    del state["model.layers.3.mlp.up_proj.weight"]
    state["model.layers.3.mlp.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    assert out.returncode == 1
    assert "unknown tensors: model.layers.3.mlp.extra.weight" in out.stderr
    assert "missing tensors: model.layers.3.mlp.up_proj.weight" in out.stderr
    assert not os.path.exists(tmp_path / "m" / "latest_checkpointed_iteration.txt")


class Payload:
    """Not a tensor: a .bin holding it must not be unpickled."""


def test_bin_files_are_read_without_executing_pickles(tmp_path):
    tiny_hf_eve(str(tmp_path / "hf"), fmt="bin")
    first = tmp_path / "hf" / "pytorch_model-00001-of-00002.bin"
    state = torch.load(first, weights_only=True)
    state["model.norm.weight"] = Payload()
    torch.save(state, first)
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    assert out.returncode == 1 and "cannot be read as a weights-only checkpoint" in out.stderr


def test_outputs_we_did_not_write_are_not_replaced(release, tmp_path):
    """--out holding someone's files (or a training run's checkpoints) is refused without
    --overwrite; our own earlier output is replaced, never deleted before the new one is in place."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for script, source in (("megatron_to_hf.py", ["--megatron", release / "megatron"]),
                           ("hf_to_megatron.py", ["--hf", release / "hf"])):
        out = convert(script, *source, "--out", precious, "--dtype", "float32")
        assert out.returncode == 1 and "holds files that are not" in out.stderr and "--overwrite" in out.stderr
        assert (precious / "notes.txt").read_text() == "mine" and sorted(os.listdir(precious)) == ["notes.txt"]

    # A training root (later iterations, its own marker) is not a conversion either.
    training = tmp_path / "training"
    training.mkdir()
    (training / "iter_0000100").mkdir()
    (training / "latest_checkpointed_iteration.txt").write_text("100")
    out = convert("hf_to_megatron.py", "--hf", release / "hf", "--out", training, "--dtype", "float32")
    assert out.returncode == 1 and (training / "latest_checkpointed_iteration.txt").read_text() == "100"

    # Our own outputs are converted again in place; --overwrite replaces anything.
    export = tmp_path / "export"
    ok(convert("megatron_to_hf.py", "--megatron", release / "megatron", "--out", export, "--dtype", "float32"))
    ok(convert("megatron_to_hf.py", "--megatron", release / "megatron", "--out", export, "--dtype", "float32"))
    assert not os.path.exists(f"{export}.replaced") and (export / "config.json").is_file()
    for _ in range(2):
        ok(convert("hf_to_megatron.py", "--hf", release / "hf", "--out", tmp_path / "converted", "--dtype", "float32"))
    ok(convert("megatron_to_hf.py", "--megatron", release / "megatron", "--out", precious, "--dtype", "float32",
               "--overwrite"))
    assert not (precious / "notes.txt").exists() and (precious / "modeling_eve.py").is_file()


def test_damaged_inputs_get_one_line_naming_the_file(tmp_path):
    import shutil

    tiny_hf_eve(str(tmp_path / "st"), fmt="safetensors")
    tiny_hf_eve(str(tmp_path / "bin"), fmt="bin")
    cases = {}
    shutil.copytree(tmp_path / "st", tmp_path / "config")
    (tmp_path / "config" / "config.json").write_text("{ not json")
    cases["config"] = "config.json: not valid JSON"
    shutil.copytree(tmp_path / "st", tmp_path / "safetensors")
    data = (tmp_path / "st" / "model.safetensors").read_bytes()
    (tmp_path / "safetensors" / "model.safetensors").write_bytes(data[:1000])
    cases["safetensors"] = "model.safetensors: cannot be read as safetensors"
    shutil.copytree(tmp_path / "bin", tmp_path / "shard")
    index_path = tmp_path / "shard" / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = next(s for s in shards if s != index["weight_map"]["lm_head.weight"])
    index_path.write_text(json.dumps(index))
    cases["shard"] = "tensor lm_head.weight is not in this shard, though the index says it is"
    for name, message in cases.items():
        out = convert("hf_to_megatron.py", "--hf", tmp_path / name, "--out", tmp_path / f"out_{name}")
        assert out.returncode == 1 and message in out.stderr, (name, out.stderr[-2000:])
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_a_release_with_distinct_widths_round_trips_bit_exactly(tmp_path):
    """A bf16 checkpoint saved the release's way (its key names, its config.json fields only) whose
    vision tokenizer (64) and teacher (32) widths differ: converts without --dtype (stays bf16),
    loads at TP=2 and PP=2, exports back bit-exactly, with a config.json and processor config the
    original EVE code can load, and the teacher's weights with --with-teacher."""
    from megatron_eve.checkpoint.hf_eve import MegatronCheckpoint
    from tests.helpers import save_tiny_teacher, tiny_config

    model = tiny_config(changes={"aligner.hidden_size": 32, "vision.image_size": 672, "vision.teacher_image_size": 336})
    source = release_like_eve(str(tmp_path / "release"), model)
    ok(convert("hf_to_megatron.py", "--hf", tmp_path / "release", "--out", tmp_path / "megatron",
               "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2))
    stored = MegatronCheckpoint(str(tmp_path / "megatron" / "iter_0000000"))
    assert stored.shapes["aligner.input_layer.weight"] == ((32, 128), torch.bfloat16)
    assert stored.shapes["vision_model.patch_embedding.weight"][0] == (64, 3, 14, 14)

    teacher = save_tiny_teacher(str(tmp_path / "teacher"), model)
    original = {k: v for k, v in source.items() if "vision_clip" not in k and "inv_freq" not in k}
    export = tmp_path / "export"
    ok(convert("megatron_to_hf.py", "--megatron", tmp_path / "megatron", "--out", export, "--format", "bin",
               "--with-teacher", "--teacher", teacher, "--no-progress"))  # no --dtype: stays bf16
    exported = model_tensors(export)
    assert set(exported) == set(original)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], original[k]) for k in original)
    for layout in (["--tp", "2"], ["--pp", "2"]):  # loaded by the real model at another layout (fp32 there)
        relaid = tmp_path / f"relaid{layout[0]}"
        torchrun("conversion_worker.py", 2, ["relayout", "--src", tmp_path / "megatron", "--dst", relaid, *layout])
        again = tmp_path / f"export{layout[0]}"
        ok(convert("megatron_to_hf.py", "--megatron", relaid, "--out", again, "--dtype", "bfloat16", "--no-progress"))
        exported = model_tensors(again)
        assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)

    config = json.loads((export / "config.json").read_text())
    assert config["mm_hidden_size"] == 64 and config["mm_hidden_size_clip"] == 32
    assert config["torch_dtype"] == "bfloat16" and config["requires_cliploss"] is True
    assert config["mm_use_im_patch_token"] is False and config["mm_use_im_start_end"] is False
    assert config["mm_vision_tower"] == str(export) and config["mm_vision_tower_clip"] == teacher
    processor = json.loads((export / "preprocessor_config.json").read_text())
    assert (processor["image_size"], processor["image_size_clip"], processor["patch_stride"], processor["conv_stride"]) \
        == (672, 336, 14, 2)
    assert processor["do_resize"] is False and processor["image_mean"][0] == pytest.approx(0.48145466)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor.from_pretrained(str(export))  # what the original code calls on mm_vision_tower
    teacher_keys = [k for k in HFWeights(str(export)).keys() if k.startswith("model.vision_clip.backbone.vision_model.")]
    # The release names them as transformers 4.x's CLIPVisionModel does: vision_model.<module key>
    # (transformers 5 saves the same tensors without the prefix).
    saved = [k for k in HFWeights(teacher).keys() if not k.endswith("position_ids")]
    expected = [k if k.startswith("vision_model.") else f"vision_model.{k}" for k in saved]
    assert len(expected) > 20 and sorted(teacher_keys) == sorted(f"model.vision_clip.backbone.{k}" for k in expected)


def test_a_teacher_width_that_contradicts_the_weights_is_an_error(tmp_path):
    from tests.helpers import tiny_config

    model = tiny_config(changes={"aligner.hidden_size": 32})
    release_like_eve(str(tmp_path / "release"), model, dtype=torch.float32)
    config_path = tmp_path / "release" / "config.json"
    config = json.loads(config_path.read_text())
    config["mm_hidden_size_clip"] = 64
    config_path.write_text(json.dumps(config))
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "release", "--out", tmp_path / "m")
    assert out.returncode == 1
    assert "mm_hidden_size_clip 64, but model.vision_tower_compressor.input_layer.weight has 32 rows" in out.stderr


def test_rope_base_and_scaling_as_transformers_writes_them(tmp_path):
    """transformers 5 stores RoPE's base under rope_parameters: it must be read, not defaulted."""
    from transformers import LlamaConfig

    from megatron_eve.checkpoint.hf_config import language_config, read_hf_config
    from megatron_eve.checkpoint.hf_eve import CheckpointFormatError

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=256, rope_theta=500000.0).save_pretrained(tmp_path / "base")
    written = read_hf_config(str(tmp_path / "base"))
    assert language_config(written).rotary_base == 500000
    assert language_config({**written, "rope_parameters": None, "rope_theta": 10000.0}).rotary_base == 10000
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                rope_scaling={"rope_type": "linear", "factor": 2.0}).save_pretrained(tmp_path / "scaled")
    with pytest.raises(CheckpointFormatError, match="'linear' RoPE scaling"):
        language_config(read_hf_config(str(tmp_path / "scaled")))
    with pytest.raises(CheckpointFormatError, match="disagree"):
        language_config({**written, "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}})


def test_export_scales_integer_images_by_their_bit_depth_as_training_does():
    """process_images of the export's standalone file gives 16- and 32-bit integer images the
    pixels training and eval give them (records.to_rgb), not convert("RGB")'s clipped ones; 8-bit
    images are as before."""
    import types

    import numpy as np
    from PIL import Image

    from megatron_eve.data.records import to_rgb
    from megatron_eve.hf.modeling_eve import CLIP_MEAN, CLIP_STD, EVELlamaForCausalLM

    # process_images reads only these three settings.
    model = types.SimpleNamespace(config=types.SimpleNamespace(image_size_clip=28, patch_stride=14, image_size=56))

    def pixels(image):
        return EVELlamaForCausalLM.process_images(model, [image])

    ramp = np.arange(40 * 30, dtype=np.int64).reshape(30, 40)
    images = {
        "I;16, nearly black": Image.fromarray((ramp % 200).astype(np.uint16)),
        "I;16, full range": Image.fromarray((ramp * 54).astype(np.uint16)),
        "I, 16-bit values (a 16-bit PNG)": Image.fromarray((ramp * 37).astype(np.int32)),
        "I, 8-bit values": Image.fromarray((ramp % 256).astype(np.int32)),
        "I, 32-bit values and negatives": Image.fromarray((ramp * 1_700_000 - 9_000_000).astype(np.int32)),
    }
    assert images["I;16, nearly black"].mode == "I;16" and images["I, 8-bit values"].mode == "I"
    for name, image in images.items():
        ours = pixels(image)
        assert torch.equal(ours, pixels(to_rgb(image))), name
        if name != "I, 8-bit values":  # Pillow's clipping differs from scaling there
            assert not torch.equal(ours, pixels(image.convert("RGB"))), name

    colour = (10, 200, 30)
    rgb = Image.new("RGB", (28, 28), colour)
    expected = (torch.tensor(colour, dtype=torch.float32) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    out = pixels(rgb)[0]
    assert torch.equal(out[:3], expected.view(3, 1, 1).expand(3, 56, 56)) and bool((out[3] == 1).all())
    for eight_bit in (rgb, Image.fromarray((ramp % 256).astype(np.uint8)), rgb.convert("P")):
        assert torch.equal(pixels(eight_bit), pixels(eight_bit.convert("RGB")))
    with pytest.raises(ValueError, match="mode F"):
        pixels(Image.fromarray(ramp.astype(np.float32)))


def test_the_exports_generate_takes_input_ids_by_keyword_and_counts_placeholders():
    """generate(input_ids=ids, images=px) raised IndexError (only the positional form worked); more
    <image> placeholders than images did too: a ValueError that says so."""
    from megatron_eve.checkpoint.hf_config import hf_config
    from megatron_eve.hf.modeling_eve import IMAGE_TOKEN_INDEX, EVEConfig, EVELlamaForCausalLM
    from tests.helpers import random_image, tiny_config

    config = hf_config(tiny_config(), torch.float32)
    config.pop("auto_map")
    torch.manual_seed(0)
    model = EVELlamaForCausalLM(EVEConfig(**config)).eval()
    pixels = model.process_images([random_image(60, 40, seed=0)])
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8]])
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    positional = model.generate(ids, images=pixels, **settings)
    assert torch.equal(model.generate(input_ids=ids, images=pixels, **settings), positional)
    assert positional.shape == (1, 3)
    two = torch.tensor([[1, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX]])
    for call in (lambda: model.generate(two, images=pixels, **settings),
                 lambda: model.generate(input_ids=two, images=pixels, **settings),
                 lambda: model(input_ids=two, images=pixels)):
        with pytest.raises(ValueError, match="^2 <image> placeholders for 1 images$"):
            call()
