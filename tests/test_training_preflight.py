"""pretrain_eve.py's checks before work (training.preflight.check_job on the flags and the files
they name): bad option combinations, outputs that cannot be written or hold another run, a resume
with another tokenizer, a --load without a checkpoint, each refused in one error before any model
is built."""

import re
import subprocess
import sys

import pytest

from megatron_eve.config import ConfigError
from megatron_eve.training.arguments import parse_args
from megatron_eve.training.loop import check_job
from tests.helpers import ROOT, base_args


def job_args(data, *extra):
    return parse_args(base_args(data, "pretrain") + ["--train-iters", "3", *map(str, extra)])


@pytest.mark.parametrize("extra, world, message", [
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--tensor-model-parallel-size", "4"], 2, "do not divide the world size 2"),
    (["--seq-length", "64"], 1, "--seq-length 64 is below one square image's 73 tokens"),
    (["--vision-teacher-path", ""], 1, "--vision-teacher-path is not set"),
    (["--vision-teacher-path", "/nonexistent/clip"], 1,
     "--vision-teacher-path /nonexistent/clip: not a folder holding an HF CLIP model (no config.json)"),
    # --eval-iters is Megatron's 100 unless given: --eval-interval alone evaluates, on a valid split.
    (["--eval-interval", "2", "--split", "100,0,0"], 1,
     "--eval-interval 2 evaluates on the valid split, but --split 100,0,0 gives it no weight"),
    (["--data-path", "/nonexistent/prefix"], 1, "/nonexistent/prefix: no dataset there"),
    (["--split", "0,1,0"], 1, "--split 0,1,0 gives the train split no weight"),
    # What the blend makes of the data, before any model is built (data.dataset.check_blend).
    (["--split", "1,1000000,0"], 1, "--data-path: no dataset has a training sample: "),
    (["--image-size", "448"], 1, "holds 224/112-px images but the model takes 448/112"),
    (["--micro-batch-size", "0"], 2, "--micro-batch-size 0 must be at least 1"),
    (["--tensor-model-parallel-size", "0"], 2, "--tensor-model-parallel-size 0 must be at least 1"),
    (["--log-interval", "0"], 1, "--log-interval 0 must be at least 1"),
    (["--save-interval", "0"], 1, "--save-interval 0 must be at least 1"),
    (["--num-workers", "-1"], 1, "--num-workers -1 must not be negative"),
    (["--ckpt-format", "torch"], 1, "--ckpt-format torch: only torch_dist (megatron-core dist-checkpointing) is read"),
    (["--ckpt-step", "3"], 1, "--ckpt-step names an iteration to load: give --load (or --pretrained-checkpoint)"),
    (["--num-layers-per-virtual-pipeline-stage", "2"], 2, "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers-per-virtual-pipeline-stage 3 x pipeline-model-parallel-size 2 does not divide num_layers 8"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "4"], 2,
     "gives one chunk per pipeline stage"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--micro-batch-size", "1", "--global-batch-size", "3"], 2,
     "interleaved pipelining needs a multiple of pipeline-model-parallel-size 2 micro-batches per step"),
])
def test_bad_configs_are_refused_before_work(data, extra, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_job(job_args(data, *extra), world)


def test_outputs_that_cannot_be_written_or_hold_another_run_are_refused_before_work(data, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"--save {tmp_path}/a-file/ck: {tmp_path}/a-file is a file")):
        check_job(job_args(data, "--save", tmp_path / "a-file" / "ck"), 1)
    tensorboard_refusal = f"--tensorboard-dir {tmp_path}/a-file: {tmp_path}/a-file is a file"
    with pytest.raises(ConfigError, match=re.escape(tensorboard_refusal)):
        check_job(job_args(data, "--tensorboard-dir", tmp_path / "a-file"), 1)
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(ConfigError, match=re.escape(f"--save {other} holds another run's checkpoints (up to iteration "
                                                    f"3), which this run would overwrite: pass --load {other}")):
        check_job(job_args(data, "--save", other), 1)
    with pytest.raises(ConfigError, match=re.escape("--split 'a,b': give three non-negative weights")):
        check_job(job_args(data, "--split", "a,b"), 1)
    check_job(job_args(data, "--save", tmp_path / "new" / "ck", "--tensorboard-dir", tmp_path / "tb"), 1)


def test_another_tokenizer_is_refused_on_resume_and_a_warning_at_a_new_stage(data, tmp_path, monkeypatch, caplog):
    """The checkpoint records its tokenizer's SHA-256: check_job refuses a resume with another
    --tokenizer-model (naming both) and warns once when a new stage starts from it."""
    from dataclasses import asdict

    from megatron.core import dist_checkpointing

    from megatron_eve.data.tokenizer import Tokenizer
    from megatron_eve.training.checkpoint_records import checkpoint_dir

    (tmp_path / "ck" / "iter_0000003").mkdir(parents=True)
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("3")
    common = {"tokenizer_model": "/elsewhere/other.model", "tokenizer_sha256": "0" * 64,
              "model_config": asdict(job_args(data).model)}
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda directory: common)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=re.escape(f"{checkpoint_dir(str(tmp_path / 'ck'), 3)} was trained with the "
                                                    f"tokenizer /elsewhere/other.model (sha256 000000000000), not "
                                                    f"--tokenizer-model {data['tokenizer']} (sha256 ")):
        check_job(job_args(data, "--load", tmp_path / "ck", "--save", tmp_path / "ck"), 1)
    caplog.clear()
    check_job(job_args(data, "--pretrained-checkpoint", tmp_path / "ck", "--save", tmp_path / "new"), 1)
    assert [r.getMessage().count("was trained with the tokenizer /elsewhere/other.model") for r in caplog.records] \
        == [1]
    common["tokenizer_sha256"] = Tokenizer(data["tokenizer"]).checksum
    check_job(job_args(data, "--load", tmp_path / "ck", "--save", tmp_path / "ck"), 1)  # the same content


def test_bad_config_exit_status(data, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "pretrain_eve.py"), *base_args(data, "pretrain"),
                          "--train-iters", "2", "--seq-length", "32"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: cannot start training" in out.stderr and "--seq-length 32" in out.stderr


def test_a_load_folder_without_a_checkpoint_is_refused_before_work(data, tmp_path):
    """Megatron-LM would start from scratch; a mistyped --load must not: refused by the checks before
    any model is built, unless it is the --save folder of a first run (or --pretrained-checkpoint starts it)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    refusal = re.escape(f"--load {empty}: no latest_checkpointed_iteration.txt (no complete checkpoint there)")
    with pytest.raises(ConfigError, match=refusal):
        check_job(job_args(data, "--load", empty), 1)
    with pytest.raises(ConfigError, match=refusal):
        check_job(job_args(data, "--load", empty, "--save", empty, "--finetune"), 1)
    check_job(job_args(data, "--load", empty, "--save", empty), 1)
    check_job(job_args(data, "--load", tmp_path / "new", "--save", tmp_path / "new"), 1)


def test_a_new_stage_may_take_longer_sequences_than_its_checkpoint(data, tmp_path, monkeypatch):
    """RoPE has no position table: --max-position-embeddings is a run's option, as EVE-7B-HD's SFT
    (8192 positions) starts from the 4096-position pretrain checkpoint; a shape-deciding field
    still differs in one refusal, from the flags or under --use-checkpoint-args."""
    from dataclasses import asdict

    from megatron.core import dist_checkpointing

    from megatron_eve.data.tokenizer import Tokenizer

    (tmp_path / "ck" / "iter_0000003").mkdir(parents=True)
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("3")
    recorded = asdict(job_args(data).model)
    common = {"tokenizer_model": data["tokenizer"], "tokenizer_sha256": Tokenizer(data["tokenizer"]).checksum,
              "model_config": recorded}
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda directory: common)
    longer = recorded["language"]["max_position_embeddings"] * 2
    for extra in ([], ["--use-checkpoint-args"]):
        job = job_args(data, "--pretrained-checkpoint", tmp_path / "ck", "--save", tmp_path / "new", *extra,
                       "--seq-length", longer, "--max-position-embeddings", longer)
        check_job(job, 1)
        assert job.model.language.max_position_embeddings == longer
        check_job(job_args(data, "--load", tmp_path / "ck", "--save", tmp_path / "ck", *extra,
                           "--max-position-embeddings", longer), 1)  # a resume, too
    with pytest.raises(ConfigError, match=re.escape("language.num_query_groups: 2 vs ")):
        check_job(job_args(data, "--pretrained-checkpoint", tmp_path / "ck", "--save", tmp_path / "new",
                           "--num-query-groups", 2), 1)


def test_data_preprocessed_for_another_stage_is_warned_about(data, caplog, monkeypatch):
    """A dataset's template against EVE's for the stage (plain captions to prealign / pretrain, a
    conversation to SFT) and its --max-length against --seq-length: legal, said once by rank 0."""
    monkeypatch.setenv("RANK", "0")

    def warnings(stage, kind, *extra):
        caplog.clear()
        check_job(parse_args(base_args(data, stage, kind) + ["--train-iters", "3", *map(str, extra)]), 1)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings("prealign", "captions") == warnings("finetune", "qa") == []
    assert warnings("finetune", "captions") == [f"warning: {data['captions']} was preprocessed with --template plain; "
                                                f"EVE's finetune stage trains on a conversation template (vicuna_v1)"]
    assert warnings("pretrain", "qa") == [f"warning: {data['qa']} was preprocessed with --template vicuna_v1; EVE's "
                                          f"pretrain stage trains on plain"]
    assert warnings("finetune", "qa", "--seq-length", 8192, "--max-position-embeddings", 8192) == [
        f"warning: {data['qa']} was preprocessed with --max-length 4096: its samples were dropped beyond 4096 "
        f"positions, while --seq-length 8192 would take them"]
    monkeypatch.setenv("RANK", "1")
    assert warnings("finetune", "captions") == []


def test_prealign_without_an_image_is_refused_before_work(data, tmp_path):
    """Prealign trains the PEL, projector and aligner only: on text alone every step's gradient is
    zero (it ran to its end, training nothing)."""
    import json

    import numpy as np

    from megatron_eve.data.indexed import read_metadata
    from megatron_eve.data.indexed_writer import SampleWriter
    from megatron_eve.data.records import Sample

    keep = ("template", "image_size", "teacher_image_size", "patch_size", "conv_stride", "tokenizer_sha256",
            "tokenizer_vocab_size")
    meta = {key: value for key, value in read_metadata(data["captions"]).items() if key in keep}
    text = str(tmp_path / "text")
    with SampleWriter(text, meta) as writer:
        for i in range(8):
            tokens = np.arange(3, 40, dtype=np.int32)
            writer.add(Sample(f"t{i}", tokens, tokens.copy()))
        writer.finalize()
    assert json.load(open(text + ".meta.json"))["counts"]["images"] == 0
    refusal = "--stage prealign trains the vision parts only, and no dataset of --data-path holds an image"
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        check_job(parse_args(base_args(data) + ["--train-iters", "3", "--data-path", text]), 1)
    with pytest.raises(ConfigError, match=re.escape(refusal)):  # a weight-0 dataset gives no image
        check_job(parse_args(base_args(data) + ["--train-iters", "3", "--data-path", "1", text, "0",
                                                data["captions"]]), 1)
    check_job(parse_args(base_args(data) + ["--train-iters", "3", "--data-path", text, data["captions"]]), 1)
    check_job(parse_args(base_args(data, "pretrain") + ["--train-iters", "3", "--data-path", text]), 1)
