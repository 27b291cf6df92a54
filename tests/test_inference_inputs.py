"""What generate.py, eval_vqa.py answer and the demo (tools/app.py) refuse before any model is loaded:
a tokenizer file that is not one, an --hf path that is not an export folder, sampling values out of
range, a port out of range. Each is one line naming the file or flag, never a traceback. Most run in
this process; the setup of a --load run (it makes a process group) runs in a child."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_eve.config import ConfigError
from tests.helpers import ROOT, child_environment


def one_error_line(err: str) -> str:
    """The error line of a tool's stderr (children may log a warning first); fails on a traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def tool(name, *argv, timeout=300):
    """tools/<name> run in a child: (exit code, its one error line)."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, argv)], capture_output=True,
                         text=True, timeout=timeout, env=child_environment())
    return out.returncode, one_error_line(out.stderr)


def in_process(main, *argv):
    """A tool's main(argv) here: (exit code, stderr), argparse's exit included."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


# ------------------------------------------------------------------------------ tokenizer files

@pytest.fixture
def bad_tokenizers(tmp_path):
    (tmp_path / "empty.json").write_bytes(b"")  # sentencepiece: "unk is not defined."
    (tmp_path / "garbage.model").write_text('{"not": "a model"}')
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, why", [
    ("empty.json", "not a SentencePiece model (INTERNAL: unk is not defined.)"),
    ("garbage.model", "not a SentencePiece model (INTERNAL: could not parse ModelProto from "),
    ("nowhere.model", "no such file or folder"),
    ("folder", "a folder without tokenizer.model"),
])
def test_a_bad_tokenizer_file_is_a_config_error_naming_it(bad_tokenizers, name, why):
    from megatron_eve.data.tokenizer import Tokenizer

    path = bad_tokenizers / name
    with pytest.raises(ConfigError) as raised:  # what the tools print as one line (it was a RuntimeError)
        Tokenizer(str(path))
    assert str(raised.value).startswith(f"--tokenizer-model {path}: {why}")
    assert isinstance(raised.value, OSError)  # preprocess_data and training's checks report it by that type
    with pytest.raises(ConfigError, match=f"^--hf {path}: "):
        Tokenizer(str(path), flag="--hf")


def test_an_unreadable_tokenizer_file_is_named(corpus, monkeypatch):
    """sentencepiece says PERMISSION_DENIED without the file (chmod cannot show it to root: open fails here)."""
    import megatron_eve.data.tokenizer as tokenizer_module

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(tokenizer_module, "open", denied, raising=False)
    with pytest.raises(ConfigError) as raised:
        tokenizer_module.Tokenizer(corpus["tokenizer"])
    assert str(raised.value) == f"--tokenizer-model {corpus['tokenizer']}: cannot be read (Permission denied)"


def test_a_bad_tokenizer_is_refused_before_the_megatron_checkpoint_loads(bad_tokenizers, tmp_path):
    from megatron_eve.inference.backends import make_backend

    args = SimpleNamespace(hf=None, load=str(tmp_path), tokenizer_model=str(bad_tokenizers / "empty.json"),
                           no_kv_cache=False, bf16=False)
    with pytest.raises(ConfigError, match="^--tokenizer-model .*empty.json: not a SentencePiece model"):
        make_backend(args)  # tmp_path holds no checkpoint: loading it first would fail otherwise
    args.load = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="^--load .*missing: no such checkpoint folder$"):
        make_backend(args)


def test_generate_with_a_bad_tokenizer_is_one_line(bad_tokenizers, tmp_path):
    code, line = tool("generate.py", "--load", tmp_path, "--tokenizer-model", bad_tokenizers / "empty.json",
                      "--prompt", "Hi")
    assert code == 1 and line.startswith(f"error: --tokenizer-model {bad_tokenizers / 'empty.json'}: not a ")


# ------------------------------------------------------------------------------ --hf folders

@pytest.mark.parametrize("make, why", [
    (lambda path: None, "no such folder; pass an HF export folder (holding config.json)"),
    (lambda path: path.write_text("{}"), "a file; pass an HF export folder (holding config.json)"),
    (lambda path: path.mkdir(), "no config.json in it (not an HF export folder)"),
])
def test_hf_must_be_a_folder_holding_config_json(tmp_path, capsys, make, why):
    """transformers took a missing folder for a Hub repo id (OSError), a file or an empty folder
    for an unknown model (ValueError)."""
    from tools.generate import main

    path = tmp_path / "export"
    make(path)
    assert in_process(main, "--hf", path, "--prompt", "Hi") == 1
    assert one_error_line(capsys.readouterr().err) == f"error: --hf {path}: {why}"


# ------------------------------------------------------------------------------ sampling values

BAD_SAMPLING = [
    (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1], not 0.0"),  # multinomial's RuntimeError
    (["--top-p", "5"], "--top-p must be in (0, 1], not 5.0"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more, not -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number, not nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, not inf"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more, not 0"),
]


@pytest.mark.parametrize("flags, message", BAD_SAMPLING)
def test_generate_refuses_sampling_flags_out_of_range(tmp_path, capsys, flags, message):
    from tools.generate import main

    # --hf names nothing: the flags are refused before setup would try it
    assert in_process(main, "--hf", tmp_path / "unused", "--prompt", "Hi", *flags) == 2
    assert one_error_line(capsys.readouterr().err) .startswith(f"error: {message} (see ")


@pytest.mark.parametrize("flags, message", BAD_SAMPLING)
def test_the_demo_refuses_sampling_flags_out_of_range(tmp_path, capsys, flags, message):
    from tools.app import main

    assert in_process(main, "--load", tmp_path / "unused", "--tokenizer-model", tmp_path / "unused", *flags) == 2
    assert one_error_line(capsys.readouterr().err) .startswith(f"error: {message} (see ")


@pytest.mark.parametrize("values, message", [
    ((6, -1, 1.0), "temperature must be 0 (greedy) or more, not -1.0"),
    ((6, 1.0, 5), "top_p must be in (0, 1], not 5.0"),
    ((0, 0.0, 1.0), "max_new_tokens must be between 1 and 2048, not 0"),
    (("many", 0.0, 1.0), "max_new_tokens must be a number, not 'many'"),
])
def test_the_chat_checks_values_as_the_flags_are_checked(values, message):
    from megatron_eve.inference.generate import SamplingError
    from tools.app import parse_sampling

    with pytest.raises(ValueError) as raised:
        parse_sampling(*values, limit=2048)
    assert str(raised.value) == message
    assert isinstance(raised.value, SamplingError) or "number" in message
    assert parse_sampling("6", "0.5", "0.9", 2048, seed=3).seed == 3


# ------------------------------------------------------------------------------ the demo's own flags

@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_the_demo_refuses_a_port_out_of_range(tmp_path, capsys, port):
    from tools.app import main

    assert in_process(main, "--load", tmp_path, "--tokenizer-model", tmp_path, "--port", port) == 2
    line = one_error_line(capsys.readouterr().err)  # "(see PROG --help)": PROG is pytest's here
    assert line.startswith(f"error: argument --port: must be between 1 and 65535, not {port} (see ")


def test_the_demo_lists_only_the_flags_it_takes(capsys):
    from tools.app import main

    assert in_process(main, "--help") == 0
    usage = capsys.readouterr().out
    assert "--load" in usage and "--tokenizer-model" in usage
    for refused in ("--hf", "--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        assert refused not in usage.split("options:")[1], refused
    assert in_process(main, "--load", "ckpt", "--hf", "x") == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: unrecognized arguments: --hf x (see ")


def test_bf16_help_speaks_of_inference(capsys):
    from tools.generate import main

    assert in_process(main, "--help") == 0
    usage = capsys.readouterr().out
    assert "--bf16" in usage and "optimizer" not in usage


def test_the_demo_with_a_missing_checkpoint_is_one_line(corpus, tmp_path):
    code, line = tool("app.py", "--load", tmp_path / "missing", "--tokenizer-model", corpus["tokenizer"])
    assert (code, line) == (1, f"error: --load {tmp_path / 'missing'}: no such checkpoint folder")
    code, line = tool("app.py", "--load", tmp_path, "--tokenizer-model", corpus["tokenizer"])  # a folder, no checkpoint
    assert (code, line) == (1, f"error: {tmp_path}: no latest_checkpointed_iteration.txt")


# ------------------------------------------------------------------------------ seeds, prompts, images, Ctrl-C

@pytest.mark.parametrize("seed", ["99999999999999999999999", "-9223372036854775809", "18446744073709551616"])
def test_a_seed_beyond_torchs_range_is_one_line_naming_seed(tmp_path, capsys, seed):
    """torch.manual_seed's OverflowError came once the model had loaded, as a traceback."""
    from tools.app import main as demo
    from tools.eval_vqa import main as eval_vqa
    from tools.generate import main as generate

    for main, argv in ((generate, ["--hf", tmp_path, "--prompt", "Hi"]), (demo, ["--load", tmp_path]),
                       (eval_vqa, ["answer", "--hf", tmp_path, "--question-file", tmp_path / "q.jsonl",
                                   "--answers-file", tmp_path / "a.jsonl"])):
        assert in_process(main, *argv, "--seed", seed) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: argument --seed: must be between -9223372036854775808 and "
                               f"18446744073709551615, not {seed} (see "), line


def test_the_seed_range_is_torchs():
    import torch

    for seed in (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF):
        torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_an_empty_prompt_is_refused(tmp_path, capsys, prompt):
    """--prompt "" printed nothing and exited 0; "   " was sent to the model."""
    from tools.generate import main

    assert in_process(main, "--hf", tmp_path / "unused", "--prompt", prompt) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: --prompt is empty: give a question, or omit ")


def test_an_image_that_is_a_folder_is_named_as_one(tmp_path):
    from megatron_eve.inference.backends import open_images
    from megatron_eve.inference.generate import PromptError

    with pytest.raises(PromptError, match=f"^image {tmp_path} is a folder, not an image file$"):
        open_images([str(tmp_path)])
    with pytest.raises(PromptError, match="nowhere.png does not exist$"):
        open_images([str(tmp_path / "nowhere.png")])


class Interrupted:
    """Standard input whose reader is interrupted (Ctrl-C) after `lines`."""

    def __init__(self, *lines):
        self.lines = list(lines)

    def __iter__(self):
        yield from self.lines
        raise KeyboardInterrupt


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_in_generate_is_one_line_from_rank_zero(tmp_path, capsys, monkeypatch, rank):
    """Interactive mode waiting on standard input: a traceback before; now "interrupted", exit code 130,
    said by rank 0 only (torchrun interrupts every rank)."""
    import tools.generate

    class Backend:
        def answer(self, requests, sampling):
            return ["an answer"]

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(tools.generate, "setup", lambda args: (Backend(), rank == "0"))
    monkeypatch.setattr(sys, "stdin", Interrupted("What is it?\n", "\n"))
    try:
        assert in_process(tools.generate.main, "--hf", tmp_path) == 130
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("Ctrl-C escaped generate.py (a traceback)")
    out, err = capsys.readouterr()
    assert (out, err) == (("an answer\n", "interrupted\n") if rank == "0" else ("", ""))
