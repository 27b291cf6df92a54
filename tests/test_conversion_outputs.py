"""Converters' outputs and errors: folders they did not write are never deleted, a linked --out keeps
its link, a replaced root holds only the new conversion, incomplete vision weights and malformed
config.json fields are refused, and every failure is one line that leaves nothing behind."""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from megatron_eve.atomic import ASIDE_MARK, STAGING_MARK, recover_replaced, replace_directory
from tests.hf_fixtures import tiny_hf_eve
from tests.test_conversion import CONVERT, convert, ok


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny HF EVE (safetensors) and its conversion."""
    root = tmp_path_factory.mktemp("outputs")
    tiny_hf_eve(str(root / "hf"), fmt="safetensors", with_teacher_keys=False)
    ok(convert("hf_to_megatron.py", "--hf", root / "hf", "--out", root / "megatron"))
    return root


def export(converted, out, *extra):
    return convert("megatron_to_hf.py", "--megatron", converted / "megatron", "--out", out, "--no-progress", *extra)


def one_line_error(out, message):
    assert out.returncode == 1 and message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("error: ")


def ours_left_behind(folder):
    return [name for name in os.listdir(folder) if name.endswith(STAGING_MARK) or ASIDE_MARK in name]


def test_an_export_never_deletes_folders_it_did_not_write(converted, tmp_path):
    """"exp.tmp" and "exp.replaced" may be the user's own; a user's files added to an earlier export
    make it no longer ours to replace without --overwrite."""
    out = tmp_path / "exp"
    for name, file in (("exp.tmp", "mine.txt"), ("exp.replaced", "notes.txt")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("mine")
    for _ in range(2):
        ok(export(converted, out))
    assert (tmp_path / "exp.tmp" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "exp.replaced" / "notes.txt").read_text() == "mine"
    assert not ours_left_behind(tmp_path)

    (out / "README_mine.md").write_text("mine")
    (out / "finetune-run").mkdir()
    (out / "finetune-run" / "adapter_model.bin").write_bytes(b"mine")
    one_line_error(export(converted, out), "holds files that are not an earlier export")
    assert (out / "README_mine.md").is_file() and (out / "finetune-run" / "adapter_model.bin").is_file()


def test_replacing_a_directory_deletes_older_aside_copies_and_recovers_the_latest(tmp_path, monkeypatch):
    final, staging = tmp_path / "out", tmp_path / "new"
    final.mkdir()
    (final / "v").write_text("1")
    leftover = tmp_path / f"out{ASIDE_MARK}"  # an earlier interrupted replacement's: an older copy
    leftover.mkdir()
    users = tmp_path / "out.replaced"  # not our mark (earlier versions' name, or a user's): kept
    users.mkdir()
    staging.mkdir()
    (staging / "v").write_text("2")
    replace_directory(str(staging), str(final))
    assert (final / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["out", "out.replaced"]
    leftover.mkdir()

    # Killed between the two renames: only the moved-aside copy exists; a reader puts it back.
    staging.mkdir()
    real_replace = os.replace
    calls = []

    def killed_at_the_second_rename(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(str(staging), str(final))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (final / "v").read_text() == "2"  # the failed swap put the old copy back at once
    real_replace(final, f"{final}{ASIDE_MARK}.2")  # as a process killed outright leaves it
    recover_replaced(str(final))
    assert (final / "v").read_text() == "2" and leftover.is_dir()


def test_a_linked_out_keeps_its_link_and_the_folder_it_points_to_is_replaced(converted, tmp_path):
    (tmp_path / "big").mkdir()
    ok(export(converted, tmp_path / "big" / "eve"))
    link = tmp_path / "exp_link"
    link.symlink_to(tmp_path / "big" / "eve")
    (tmp_path / "big" / "eve" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "big" / "eve" / "config.json").read_text()), "stale": True}))
    for _ in range(2):
        ok(export(converted, link))
        assert link.is_symlink() and os.readlink(link) == str(tmp_path / "big" / "eve")
        assert "stale" not in json.loads((tmp_path / "big" / "eve" / "config.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["big", "exp_link"] and os.listdir(tmp_path / "big") == ["eve"]


def test_overwriting_a_training_root_leaves_only_the_conversion(converted, tmp_path):
    root = tmp_path / "training"
    (root / "iter_0000100").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    one_line_error(convert("hf_to_megatron.py", "--hf", converted / "hf", "--out", root), "--overwrite")
    ok(convert("hf_to_megatron.py", "--hf", converted / "hf", "--out", root, "--overwrite"))
    assert sorted(os.listdir(root)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "0" and not ours_left_behind(tmp_path)


def test_an_incomplete_vision_module_is_refused(converted, tmp_path):
    """Every PEL, projector and aligner tensor of the release must be there (a missing one would
    train from its random initialisation), except an aligner left out whole; an unknown one is
    named, not copied."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(converted / "hf", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    for key in ("model.vision_tower.local_attention.q.1.weight", "model.mm_projector.2.weight",
                "model.vision_tower_compressor.output_layer.weight"):
        del state[key]
    state["model.vision_tower.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    one_line_error(out, "missing tensors: model.mm_projector.2.weight, model.vision_tower.local_attention.q.1.weight, "
                        "model.vision_tower_compressor.output_layer.weight")
    assert "unknown tensors: model.vision_tower.extra.weight" in out.stderr and not (tmp_path / "m").exists()
    # The aligner (training only) left out whole, as a release may: converted, training starts it fresh.
    state = {k: v for k, v in load_file(converted / "hf" / "model.safetensors").items()
             if not k.startswith("model.vision_tower_compressor.")}
    save_file(state, path)
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", "8", 'num_hidden_layers is "8", not a whole number >= 1'),
    ("num_attention_heads", 0, "num_attention_heads is 0, not a whole number >= 1"),
    ("rms_norm_eps", "1e-5", 'rms_norm_eps is "1e-5", not a number > 0'),
    ("vocab_size", None, "vocab_size is null, not a whole number >= 1"),
])
def test_config_fields_of_the_wrong_type_or_range_are_named(converted, tmp_path, field, value, message):
    shutil.copytree(converted / "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, field: value}))
    out = convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "m")
    one_line_error(out, f"config.json: {message}")


def test_failures_are_one_line_and_leave_nothing_behind(converted, tmp_path):
    one_line_error(export(converted, tmp_path / "o1", "--iteration", "5"), "holds no iteration 5 (complete ones: 0)")
    (tmp_path / "afile").write_text("mine")
    one_line_error(export(converted, tmp_path / "afile"), "afile exists and is not a folder")
    one_line_error(convert("hf_to_megatron.py", "--hf", converted / "hf", "--out", tmp_path / "afile"),
                   "afile exists and is not a folder")
    assert (tmp_path / "afile").read_text() == "mine"

    shutil.copytree(converted / "megatron", tmp_path / "truncated")
    shard = tmp_path / "truncated" / "iter_0000000" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = convert("megatron_to_hf.py", "--megatron", tmp_path / "truncated", "--out", tmp_path / "o2", "--no-progress")
    one_line_error(out, "truncated/iter_0000000 cannot be loaded")
    assert "export an earlier iteration with --iteration N" in out.stderr and "latest_checkpointed" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["afile", "truncated"]


def test_generation_names_a_damaged_checkpoint(converted, tmp_path):
    from megatron_eve.config import ConfigError, ParallelConfig
    from megatron_eve.inference.generate import load_model_for_inference

    shutil.copytree(converted / "megatron", tmp_path / "truncated")
    shard = tmp_path / "truncated" / "iter_0000000" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="iter_0000000 cannot be loaded"):
        load_model_for_inference(str(tmp_path / "truncated"), ParallelConfig())


def test_resuming_from_a_conversion_points_to_pretrained_checkpoint(converted):
    """--load <converted root> holds weights only: refused before anything is loaded, naming the flag
    that starts a run from it (not "resume from an earlier iteration", nor a KeyError)."""
    from megatron_eve.config import (CheckpointConfig, ConfigError, DataConfig, LoggingConfig, OptimConfig,
                                     ParallelConfig, RuntimeConfig, ScheduleConfig, TrainingJob)
    from megatron_eve.training import checkpoint
    from tests.helpers import tiny_config

    for no_load_optim in (False, True):
        job = TrainingJob(tiny_config(), ParallelConfig(), RuntimeConfig(), OptimConfig(lr=1e-3),
                          ScheduleConfig(train_iters=1), DataConfig(),
                          CheckpointConfig(load=str(converted / "megatron"), no_load_optim=no_load_optim),
                          LoggingConfig())
        with pytest.raises(ConfigError, match=f"start from it with --pretrained-checkpoint {converted / 'megatron'}"):
            checkpoint.load(job, None, None, None)  # the model is never touched


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small Llama-style SentencePiece model (ids unk 0 / bos 1 / eos 2), fewer tokens than the tiny model's."""
    from megatron_eve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    texts = [f"a picture of {n} red cats and {n + 1} dogs on the grass, seen from above" for n in range(300)]
    return train_tokenizer(texts, str(root / "tokenizer"), 300)


def test_a_tokenizer_that_cannot_generate_is_refused_before_anything_is_written(converted, tmp_path, tokenizer):
    """A 0-byte --tokenizer-model was copied into the export as it was (rc 0, generation failed later
    with a traceback); no --tokenizer-model wrote an export without a tokenizer, saying nothing."""
    (tmp_path / "empty.json").write_bytes(b"")
    out = export(converted, tmp_path / "exp", "--tokenizer-model", tmp_path / "empty.json")
    one_line_error(out, "--tokenizer-model")
    assert "empty.json" in out.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["empty.json"]  # nothing written, no staging left

    from megatron_eve.checkpoint.hf_writer import check_tokenizer
    from megatron_eve.config import ConfigError

    # The vocabulary it is checked against is the unpadded one config.json states (tiny: 1024).
    with pytest.raises(ConfigError, match="has 300 tokens, more than the model's vocabulary of 100"):
        check_tokenizer(tokenizer, 100)
    assert check_tokenizer(tokenizer, 1024) == tokenizer

    out = ok(export(converted, tmp_path / "exp"))  # the conversion's HF folder holds no tokenizer.model
    warning = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "holds no tokenizer" in warning[0] and "--tokenizer-model" in warning[0]
    assert "tokenizer.model" not in os.listdir(tmp_path / "exp")


def test_outputs_are_readable_by_other_users_and_take_the_tokenizer_converted_from(tmp_path, tokenizer):
    """umask 022: every folder 0755 and file 0644, as open() / mkdir make them (safetensors' save_file
    made the weights 0600: other users of a shared cluster could not load an export). A conversion
    of an HF folder holding a tokenizer exports it without --tokenizer-model; --no-progress: no bar."""
    tiny_hf_eve(str(tmp_path / "hf"), fmt="safetensors", with_teacher_keys=False)
    shutil.copyfile(tokenizer, tmp_path / "hf" / "tokenizer.model")
    previous = os.umask(0o022)
    try:
        out = ok(convert("hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "megatron",
                         "--no-progress"))
        assert "converting" not in out.stderr  # tqdm's bar
        out = ok(convert("megatron_to_hf.py", "--megatron", tmp_path / "megatron", "--out", tmp_path / "exp",
                         "--max-shard-size-gb", "0.0001", "--no-progress"))
    finally:
        os.umask(previous)
    assert "warning" not in out.stderr and f"tokenizer from {tmp_path / 'hf'}, recorded in" in out.stdout
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == (tmp_path / "hf" / "tokenizer.model").read_bytes()
    names = os.listdir(tmp_path / "exp")
    assert "model.safetensors.index.json" in names and "config.json" in names  # sharded: several weight files
    for top in ("exp", "megatron"):
        for folder, _, files in os.walk(tmp_path / top):
            assert oct(os.stat(folder).st_mode & 0o777) == oct(0o755), folder
            for name in files:
                assert oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) == oct(0o644), (folder, name)


def test_a_local_teacher_is_named_by_its_absolute_path_and_a_hub_id_as_it_is(tmp_path, monkeypatch):
    """mm_vision_tower_clip was the relative path recorded at training: wrong from any other directory."""
    from megatron_eve.checkpoint.hf_config import RELEASE_TEACHER, hf_config
    from tests.helpers import tiny_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "corpus" / "teacher").mkdir(parents=True)

    def named(teacher):
        return hf_config(tiny_config(), torch.float32, teacher=teacher)["mm_vision_tower_clip"]

    assert named("runs/corpus/teacher") == str(tmp_path / "runs" / "corpus" / "teacher")
    assert named(RELEASE_TEACHER) == named(None) == RELEASE_TEACHER
    assert named("runs/elsewhere/teacher") == "runs/elsewhere/teacher"  # not here: not made absolute here


def test_shard_sizes_of_zero_or_less_are_refused(converted, tmp_path):
    for size in ("0", "-1"):
        one_line_error(export(converted, tmp_path / "exp", "--max-shard-size-gb", size),
                       f"--max-shard-size-gb {float(size)}: must be a number of GB above 0")
    assert not os.listdir(tmp_path)


def test_a_damaged_metadata_file_is_one_line_without_torch_logging_its_traceback(converted, tmp_path):
    """torch.distributed.checkpoint logs a failed `.metadata` read with its traceback (a warning on the
    root logger) before raising: ~25 lines above our one-line error."""
    shutil.copytree(converted / "megatron", tmp_path / "damaged")
    (tmp_path / "damaged" / "iter_0000000" / ".metadata").write_bytes(b"not a pickle" * 40)
    out = convert("megatron_to_hf.py", "--megatron", tmp_path / "damaged", "--out", tmp_path / "exp", "--no-progress")
    one_line_error(out, "damaged/iter_0000000 cannot be loaded")
    assert "Global metadata is not found" not in out.stderr and "Rank local metadata" not in out.stderr


def test_give_default_mode_follows_the_umask(tmp_path):
    """What open() / mkdir would give under the umask, not a fixed 0644 / 0755."""
    from megatron_eve.atomic import give_default_mode

    os.close(os.open(tmp_path / "private", os.O_CREAT | os.O_WRONLY, 0o600))  # as save_file / mkstemp make it
    os.mkdir(tmp_path / "staged", 0o700)  # as mkdtemp makes it
    previous = os.umask(0o027)
    try:
        give_default_mode(str(tmp_path / "private"))
        give_default_mode(str(tmp_path / "staged"))
    finally:
        os.umask(previous)
    assert oct((tmp_path / "private").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "staged").stat().st_mode & 0o777) == oct(0o750)


def _short_of_space(script, limit, *args):
    """A converter whose files cannot grow past `limit` bytes (RLIMIT_FSIZE: each write past it fails
    as on a full disk), run as `convert` runs it."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(CONVERT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit_file_size)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_write_that_fails_midway_is_one_line_and_keeps_the_earlier_export(converted, tmp_path, fmt):
    """safetensors and torch.save report a short write as SafetensorError / RuntimeError ("unexpected
    pos"), not OSError: each is one line naming the file, the earlier export kept, nothing left over."""
    out = tmp_path / "exp"
    ok(export(converted, out, "--format", fmt))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    failed = _short_of_space("megatron_to_hf.py", 4096, "--megatron", converted / "megatron", "--out", out,
                             "--no-progress", "--format", fmt)
    one_line_error(failed, "shard-00000.tmp: write failed (")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert not ours_left_behind(tmp_path)

    failed = _short_of_space("hf_to_megatron.py", 4096, "--hf", converted / "hf", "--out", tmp_path / "mg")
    one_line_error(failed, "write failed (")
    assert not os.path.exists(tmp_path / "mg") and not ours_left_behind(tmp_path)


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_on_its_host(converted, tmp_path):
    """A kill -9 leaves the staging folder (a whole export); the next export deletes it when its process
    is gone, and leaves a live process's and another host's (they may still be writing)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    names = {"dead": f"exp.{host}-{dead_pid}-0123abcd{STAGING_MARK}",
             "live": f"exp.{host}-{os.getpid()}-0123abcd{STAGING_MARK}",
             "elsewhere": f"exp.other-node-7-0123abcd{STAGING_MARK}"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    ok(export(converted, tmp_path / "exp"))
    assert sorted(os.listdir(tmp_path)) == sorted(["exp", names["live"], names["elsewhere"]])


def _contents(folder):
    return {os.path.relpath(os.path.join(top, name), folder): open(os.path.join(top, name), "rb").read()
            for top, _, names in os.walk(folder) for name in names}


def test_an_out_that_is_holds_or_lies_inside_the_input_is_refused_even_with_overwrite(converted, tmp_path):
    """--overwrite replaces an output, never the converter's own input: an --out that is the input folder
    (or a link to it), holds it or lies inside it is refused before any work, naming both flags."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import tiny_config

    runs, hf = tmp_path / "runs", tmp_path / "hf"
    shutil.copytree(converted / "megatron", runs / "ck")  # a training root: every iteration, optimizer state
    shutil.copytree(converted / "hf", hf)
    (tmp_path / "ck_link").symlink_to(runs / "ck")
    lm = tiny_config().language  # as test_conversion's Llama: layers the tiny preset's aligner can tap
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads, num_key_value_heads=2,
        max_position_embeddings=2048))
    llama.save_pretrained(tmp_path / "llama")
    before = {folder: _contents(folder) for folder in (runs, hf, tmp_path / "llama")}
    cases = [("megatron_to_hf.py", "--megatron", runs / "ck", runs / "ck", "would replace"),
             ("megatron_to_hf.py", "--megatron", runs / "ck", tmp_path / "ck_link", "would replace"),
             ("megatron_to_hf.py", "--megatron", tmp_path / "ck_link", runs / "ck" / "hf", "lies inside"),
             ("hf_to_megatron.py", "--hf", hf, hf, "would replace"),
             ("hf_to_megatron.py", "--hf", hf / ".." / "hf", hf / "megatron", "lies inside"),
             ("hf_to_megatron.py", "--hf", hf, tmp_path, "would replace"),  # --out holds the input
             ("llama_to_megatron.py", "--hf", tmp_path / "llama", tmp_path / "llama", "would replace")]
    for script, flag, source, out, message in cases:
        extra = ["--no-progress"] if script != "llama_to_megatron.py" else ["--preset", "tiny"]
        failed = convert(script, flag, source, "--out", out, "--overwrite", *extra)
        one_line_error(failed, f"--out {out} {message} the {flag} input {source}")
        assert {folder: _contents(folder) for folder in before} == before, (script, out)
        assert sorted(os.listdir(tmp_path)) == ["ck_link", "hf", "llama", "runs"] and os.listdir(runs) == ["ck"]


def test_export_files_state_the_models_length_version_and_unused_ids(converted, tmp_path, tokenizer):
    """tokenizer_config.json said model_max_length 4096 whatever the model's positions; config.json
    lacked the transformers_version the release's has; a vocabulary larger than the tokenizer's let
    plain generate() emit ids the tokenizer cannot decode: generation_config.json suppresses them."""
    import transformers
    from transformers import GenerationConfig

    from megatron_eve.checkpoint.hf_writer import generation_config
    from tests.helpers import tiny_config

    positions, vocab = tiny_config().language.max_position_embeddings, tiny_config().language.vocab_size
    assert positions != 4096 and vocab == 1024
    ok(export(converted, tmp_path / "exp", "--tokenizer-model", tokenizer))
    read = lambda name: json.loads((tmp_path / "exp" / name).read_text())  # noqa: E731
    assert read("tokenizer_config.json")["model_max_length"] == positions
    assert read("config.json")["transformers_version"] == transformers.__version__
    written = read("generation_config.json")
    assert written.pop("suppress_tokens") == list(range(300, vocab))  # the tokenizer has 300 ids
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    assert GenerationConfig.from_pretrained(tmp_path / "exp").suppress_tokens == list(range(300, vocab))
    ok(export(converted, tmp_path / "bare"))  # no tokenizer: nothing known to suppress
    assert "suppress_tokens" not in json.loads((tmp_path / "bare" / "generation_config.json").read_text())
    assert "suppress_tokens" not in generation_config(32000, 32000)  # the release's vocabulary: as before
