#!/usr/bin/env python3
"""megatron_eve dist checkpoint → HF EVE folder that plain transformers loads and generates with:

  python checkpoint_conversion/megatron_to_hf.py --megatron checkpoints/eve-7b-sft-672 \\
      --out exports/eve-7b --tokenizer-model vicuna-7b-v1.5 [--format bin] [--dtype bfloat16]

  AutoModelForCausalLM.from_pretrained("exports/eve-7b", trust_remote_code=True)

Writes config.json (EVE's fields and values), preprocessor_config.json (EVE's any-resolution
processor, which config.json's mm_vision_tower names, so the original EVE code finds it),
generation_config.json, safetensors shards and index (or `.bin` shards like the release with
--format bin), modeling_eve.py (registered via auto_map) and the tokenizer files (--tokenizer-model,
checked against the model before anything is written; without it, those of the HF folder a
converted checkpoint was made from, else none, with a warning); --with-teacher
adds the CLIP teacher's weights as the release stores them. Tensors keep the checkpoint's dtype
unless --dtype says otherwise; they are read a layer at a time and written a shard at a time.
"""

import argparse
import itertools
import json
import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.atomic import (  # noqa: E402
    check_apart_from_inputs, check_output_dir, os_error_line, recover_replaced, staged_directory)
from megatron_eve.checkpoint.hf_config import hf_config, preprocessor_config, read_hf_config  # noqa: E402
from megatron_eve.checkpoint.hf_eve import (  # noqa: E402
    EARLIER_ITERATION, CheckpointFormatError, MegatronCheckpoint, hf_tensors)
from megatron_eve.checkpoint.hf_writer import (  # noqa: E402
    check_tokenizer, copy_tokenizer, generation_config, is_written_name, write_tensors)
from megatron_eve.checkpoint.megatron_dirs import parse_dtype  # noqa: E402
from megatron_eve.config import ConfigError, model_config_from_dict  # noqa: E402
from megatron_eve.data.tokenizer import Tokenizer  # noqa: E402
from megatron_eve.training.checkpoint_records import (  # noqa: E402
    checkpoint_dir,
    complete_iterations,
    latest_iteration,
    reading,
)

MODELING = Path(__file__).resolve().parents[1] / "megatron_eve" / "hf" / "modeling_eve.py"
# What main() writes besides the weights and the tokenizer (hf_writer.is_written_name).
OWN_FILES = {"config.json", "preprocessor_config.json", "generation_config.json", "modeling_eve.py"}


def teacher_tensors(teacher: str, dtype):
    """The CLIP teacher's weights under the release's keys (model.vision_clip.backbone.*)."""
    if not teacher or not os.path.isfile(os.path.join(teacher, "config.json")):
        raise ConfigError(f"--with-teacher needs the teacher's local HF folder (--teacher); {teacher!r} is not one")
    from transformers import CLIPVisionModel

    for key, tensor in CLIPVisionModel.from_pretrained(teacher).state_dict().items():
        if not key.endswith("position_ids"):
            # transformers 5 names the module's own keys without the "vision_model." that 4.x (and
            # every saved CLIP file) has.
            key = key if key.startswith("vision_model.") else f"vision_model.{key}"
            yield f"model.vision_clip.backbone.{key}", tensor.to(dtype)


def is_export(folder: str) -> bool:
    """An HF folder this script wrote, and nothing else: only files of the names it writes, and
    config.json's auto_map registering our modeling file (anything more may be someone's own)."""
    names = os.listdir(folder)
    if not all((name in OWN_FILES or is_written_name(name)) and os.path.isfile(os.path.join(folder, name))
               and not os.path.islink(os.path.join(folder, name)) for name in names):
        return False
    try:
        auto_map = read_hf_config(folder).get("auto_map") or {}
    except CheckpointFormatError:
        return False
    return isinstance(auto_map, dict) and "modeling_eve.py" in names and any(
        str(v).startswith("modeling_eve.") for v in auto_map.values())


# Where a checkpoint records its tokenizer: training's --tokenizer-model, or the HF folder converted.
RECORDED_TOKENIZERS = (("tokenizer_model", "its training's --tokenizer-model"),
                       ("converted_from", "the folder it was converted from"))


def recorded_tokenizer(common: dict, vocab_size: int):
    """(source, None) for the tokenizer the checkpoint records (RECORDED_TOKENIZERS), if it is still
    there and fits the model; (None, why not) if it is unusable; (None, None) if none is there."""
    for key, what in RECORDED_TOKENIZERS:
        source = common.get(key)
        if not isinstance(source, str) or not os.path.exists(
                source if key == "tokenizer_model" else os.path.join(source, "tokenizer.model")):
            continue
        try:
            check_tokenizer(source, vocab_size)
        except ConfigError as error:
            return None, f"{what}, {source}, is unusable: " + str(error).removeprefix("--tokenizer-model ")
        return source, None
    return None, None


def looks_local(name: str) -> bool:
    """A path, not a hub id ("org/name", or a legacy "name")."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def checkpoint_to_export(root: str, iteration) -> str:
    """The iteration directory to export (the latest by default), checked to exist."""
    recover_replaced(root, legacy=False)  # a root a killed conversion left aside is put back
    iteration = iteration if iteration is not None else latest_iteration(root)
    if iteration is None:
        raise CheckpointFormatError(f"{root}: no latest_checkpointed_iteration.txt")
    directory = checkpoint_dir(root, iteration)
    if not os.path.isdir(directory):
        held = ", ".join(map(str, complete_iterations(root))) or "none"
        raise CheckpointFormatError(f"{root} holds no iteration {iteration} (complete ones: {held})")
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer.model or an HF folder holding one")
    p.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's own)")
    p.add_argument("--teacher", default=None,
                   help="the CLIP teacher to name in mm_vision_tower_clip (default: the --vision-teacher-path "
                        "the checkpoint was trained with, else the release's openai/clip-vit-large-patch14-336)")
    p.add_argument("--with-teacher", action="store_true",
                   help="also store the teacher's weights as model.vision_clip.backbone.* (the release layout), "
                        "so the original EVE code can go on training from the export")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest weight file (GB, default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files that are not an earlier export")
    args = p.parse_args(argv)
    final = os.path.abspath(args.out.rstrip("/"))
    warnings = []
    try:
        # First, whatever --overwrite says: an --out that is, holds or lies inside an input would delete it
        # (a training root's every iteration and optimizer state) or write into it.
        check_apart_from_inputs(args.out, [("--megatron", args.megatron)]
                                + ([("--teacher", args.teacher)] if args.with_teacher else []), "--out")
        if not (math.isfinite(args.max_shard_size_gb) and args.max_shard_size_gb > 0):
            # 0 or less would write one tensor per file (and inf fails only when the size is computed).
            raise ConfigError(f"--max-shard-size-gb {args.max_shard_size_gb}: must be a number of GB above 0 "
                              "(default 5)")
        recover_replaced(final, legacy=False)  # an export killed between its two renames
        check_output_dir(args.out, is_export, args.overwrite, "an earlier export of megatron_eve")
        directory = checkpoint_to_export(args.megatron, args.iteration)
        from megatron.core import dist_checkpointing

        with reading(directory, EARLIER_ITERATION):
            common = dist_checkpointing.load_common_state_dict(directory)
        if "model_config" not in common:
            raise CheckpointFormatError(f"{directory} does not record its model configuration")
        model = model_config_from_dict(common["model_config"])
        ckpt = MegatronCheckpoint(directory)
        dtype = parse_dtype(args.dtype) if args.dtype else ckpt.dtype("embedding.word_embeddings.weight")
        teacher = args.teacher or model.aligner.teacher_path
        needed = model.aligner.enabled or args.with_teacher  # the original code builds it only then
        if needed and teacher and looks_local(teacher) and not os.path.isdir(teacher):
            warnings.append(f"the teacher {teacher} is not a folder here: config.json's mm_vision_tower_clip names "
                            "it as it is (pass --teacher to name another)")
        # The tokenizer is checked before anything is written: an export that cannot generate is refused.
        tokenizer_source, recorded = args.tokenizer_model, ""
        if tokenizer_source:
            check_tokenizer(tokenizer_source, model.language.vocab_size)
        else:
            tokenizer_source, unusable = recorded_tokenizer(common, model.language.vocab_size)
            recorded = f"; tokenizer from {tokenizer_source}, recorded in the checkpoint" if tokenizer_source else ""
            if not tokenizer_source:
                warnings.append(f"{args.out} holds no tokenizer{f' ({unusable})' if unusable else ''}: it cannot be "
                                "used for generation until a tokenizer.model is copied into it (pass "
                                "--tokenizer-model)")
        tensors = hf_tensors(ckpt, model, dtype)
        if args.with_teacher:
            tensors = itertools.chain(tensors, teacher_tensors(teacher, dtype))
        # Written beside the real folder (a linked --out keeps its link) and swapped in whole.
        with staged_directory(final) as staging:
            write_tensors(staging, tensors, args.format, int(args.max_shard_size_gb * (1 << 30)),
                          progress=not args.no_progress)
            # The original code builds its vision tokenizer from the folder mm_vision_tower names (its
            # preprocessor_config.json): the export carries one and names itself.
            with open(os.path.join(staging, "preprocessor_config.json"), "w") as handle:
                json.dump(preprocessor_config(model), handle, indent=2)
            with open(os.path.join(staging, "config.json"), "w") as handle:
                json.dump(hf_config(model, dtype, vision_tower=final, teacher=teacher), handle, indent=2)
            # Without a tokenizer, its size is unknown: no padded ids are suppressed.
            known = Tokenizer(tokenizer_source).vocab_size if tokenizer_source else model.language.vocab_size
            with open(os.path.join(staging, "generation_config.json"), "w") as handle:
                json.dump(generation_config(model.language.vocab_size, known), handle, indent=2)
            shutil.copyfile(MODELING, os.path.join(staging, "modeling_eve.py"))
            if tokenizer_source:
                copy_tokenizer(tokenizer_source, staging, model.language.max_position_embeddings)
    except (CheckpointFormatError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the output side (a full disk, rights): the file, else --out
        print(f"error: {os_error_line(error, args.out)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} from {directory} ({args.format}, {str(dtype).replace('torch.', '')}"
          f"{', with the teacher' if args.with_teacher else ''}{recorded})")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
