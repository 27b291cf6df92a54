import pytest

from tests.helpers import save_tiny_teacher, tiny_config


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A random tiny CLIP vision model saved as a local HF folder (the teacher of `tiny`)."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")), tiny_config())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A synthetic captions + Q&A corpus (LLaVA records, PNG images) and a SentencePiece model
    trained on it with Llama's settings."""
    import json

    from megatron_eve.data.synthetic import make_corpus, tokenizer_texts
    from megatron_eve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    captions = make_corpus(str(root), 40, "caption", seed=1)
    qa = make_corpus(str(root), 40, "qa", seed=2, text_only_fraction=0.2)
    records = json.load(open(captions)) + json.load(open(qa))
    tokenizer = train_tokenizer(list(tokenizer_texts(records)) * 3, str(root / "tokenizer"), 400)
    return {"root": str(root), "captions": captions, "qa": qa, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus, teacher_path):
    """The corpus preprocessed for the tiny preset: captions (plain) and Q&A (vicuna_v1) prefixes."""
    from megatron_eve.data.preprocess import PreprocessJob, run
    from megatron_eve.data.records import RecordConfig

    root = tmp_path_factory.mktemp("train_data")
    vision = tiny_config().vision
    for kind, template in (("captions", "plain"), ("qa", "vicuna_v1")):
        run(PreprocessJob([corpus[kind]], str(root / kind), corpus["tokenizer"],
                          RecordConfig(template, vision, image_folder=corpus["root"]), progress=False))
    return {"captions": str(root / "captions"), "qa": str(root / "qa"), "teacher": teacher_path,
            "tokenizer": corpus["tokenizer"]}
