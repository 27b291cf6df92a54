import pytest

from tests.helpers import save_tiny_teacher, tiny_config


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A random tiny CLIP vision model saved as a local HF folder (the teacher of `tiny`)."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")), tiny_config())
