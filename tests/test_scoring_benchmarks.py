"""Across benchmarks: the answer instruction `answer` adds (once), and the one-line error for a
benchmark file that is not what its --kind takes. Each benchmark family has its own file:
tests/test_scoring_{seed,gqa,mme,textvqa,mmbench,submissions}.py; tests/test_scoring.py holds
the annotation-jsonl kinds (VQA, POPE, ScienceQA) and the in-process runner they all use."""

from megatron_eve.eval.prompts import PROMPT_STYLES, with_suffix
from tests.eval_cli import answers_file, run


def test_prompt_suffix_is_added_once():
    option = "Answer with the option's letter from the given choices directly."
    short = "Answer the question using a single word or phrase."
    assert with_suffix("What is it?", short) == "What is it?\n" + short
    assert with_suffix("Which?\nA. x\n" + option, short) == "Which?\nA. x\n" + option  # LLaVA's files carry it
    assert with_suffix("Who?", "") == "Who?"


def test_prompt_styles_are_eves_instructions():
    """`answer --prompt-style`'s texts, byte for byte as EVE's / LLaVA-1.5's scripts and question files have them."""
    short = "Answer the question using a single word or phrase."
    assert PROMPT_STYLES == {
        "short": short,
        "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'.\n" + short,
        "option": "Answer with the option's letter from the given choices directly.",
        "option-cn": "请直接回答选项字母。",
        "none": ""}
    # A question already ending with any of them (trailing whitespace aside) is asked as it is.
    for style, suffix in PROMPT_STYLES.items():
        if suffix:
            assert with_suffix("Q?\n" + suffix + " \n", "x") == "Q?\n" + suffix + " \n", style


def test_bad_benchmark_files_get_one_line(tmp_path):
    answers = answers_file(tmp_path, [{"question_id": 1, "text": "A"}])
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{\"1\": ")
    for kind, annotations, message in [
            ("seed", tmp_path / "list.json", f"error: {tmp_path / 'list.json'}: not SEED-Bench's question file"),
            ("gqa", tmp_path / "broken.json", f"error: {tmp_path / 'broken.json'}: not JSON"),
            ("mme", tmp_path / "list.json", f"error: {tmp_path / 'list.json'}: not MME's release folder"),
            ("gqa", tmp_path / "absent.json", f"error: {tmp_path / 'absent.json'}: cannot be read")]:
        code, out, err = run("score", "--kind", kind, "--answers-file", answers, "--annotations", annotations)
        assert code == 1 and out == "" and err.startswith(message) and err.count("\n") == 1, err
    code, _, err = run("submit", "--benchmark", "vqav2", "--answers-file", answers, "--output-file", tmp_path / "x")
    assert code == 1 and "needs --question-file" in err
