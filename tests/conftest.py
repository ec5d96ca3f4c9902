import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_session():
    import mmkit

    session = mmkit.load("tiny-random", device="cpu")
    yield session
    session.close()


@pytest.fixture
def session(tiny_session):
    """The shared tiny session, guaranteed method-free before and after each test."""
    tiny_session.remove_all()
    yield tiny_session
    tiny_session.remove_all()


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [(rng.random((112, 112, 3)) * 255).astype("uint8") for _ in range(3)]


PROMPTS = ["What is in the image?", "Describe the image in detail, please.", "Count the objects."]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


def forward_logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs).logits
