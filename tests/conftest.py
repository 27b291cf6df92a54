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
