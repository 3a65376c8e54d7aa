"""Content moderation: the prompt policy and the image check, unit and over HTTP on the real app in-process."""

from __future__ import annotations

import httpx
import pytest
import torch
from segmind.v2 import InferenceFailed

from fluxserve.moderation import BlocklistError, PromptPolicy

from support.app import SLUG, running_app, shared_engine, wait_status

BLOCKED = "a gory battlefield, soldiers dismembered"  # the built-in graphic_violence category
SMALL = {"width": 128, "height": 128, "steps": 2}


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a lighthouse at dusk", None),
        ("Middle-aged man sitting alone at diner counter, 3am, half-eaten pie", None),
        ("a child playing in the park", None),
        ("Décapitated statue", "graphic_violence"),
        ("SELF-HARM!", "self_harm"),
        ("a naked child", "sexual_minors"),
        ("sexy teenagers", "sexual_minors"),
        ("NSFW art", "sexual"),
        ("essex countryside, sussex downs", None),  # whole words only
        ("gorey details", None),
    ],
)
def test_builtin_policy(prompt, category):
    assert PromptPolicy.from_file().violation(prompt) == category


def test_blocklist_file_format(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# mine\n[fruit]\nbanana* | kiwi\napple & pie  # both words\n[colour]\nbright red\n")
    policy = PromptPolicy.from_file(path)
    assert policy.categories == ["colour", "fruit"]
    assert policy.violation("Bananas!") == "fruit"
    assert policy.violation("an apple") is None and policy.violation("pie made of APPLE") == "fruit"
    assert policy.violation("a bright-red car") == "colour" and policy.violation("red, bright car") is None
    assert PromptPolicy.from_file(path, ["colour"]).violation("kiwi") is None
    with pytest.raises(BlocklistError, match="unknown moderation categories"):
        PromptPolicy.from_file(path, ["nope"])
    path.write_text("orphan rule\n")
    with pytest.raises(BlocklistError, match="before any"):
        PromptPolicy.from_file(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """The app with the built-in moderation policy, on the tiny model."""
    with running_app(tmp_path_factory.mktemp("moderation"), engine=shared_engine(tiny_model),
                     model=str(tiny_model)) as app:
        yield app


@pytest.fixture()
def http(server):
    with server.http() as client:
        yield client


def test_blocked_prompt_fails_with_422_everywhere(server, http):
    request_id = http.post(f"/v2/{SLUG}", json={"positivePrompt": BLOCKED, **SMALL}).json()["request_id"]
    assert wait_status(http, request_id)["status"] == "FAILED"
    for path in (f"/v2/requests/{request_id}/status", f"/v2/requests/{request_id}"):
        response = http.get(path)
        assert response.status_code == 422
        body = response.json()
        assert body["status"] == "FAILED"
        assert body["error"] == "The prompt was blocked by content policy (category: graphic_violence)"
    assert not list((server.data_dir / "outputs").glob(f"{request_id}*"))  # nothing stored

    v1 = http.post(f"/v1/{SLUG}", json={"positivePrompt": "close-up of a beheading", **SMALL})
    assert v1.status_code == 422
    assert v1.json()["status"] == "FAILED" and "blocked by content policy" in v1.json()["error"]
    assert "behead" not in v1.json()["error"]


def test_sdk_raises_inference_failed_for_a_blocked_prompt(server):
    client = server.sdk()
    job = client.submit_async(SLUG, positivePrompt=BLOCKED, **SMALL)
    with pytest.raises(InferenceFailed) as excinfo:
        job.wait(timeout=60, interval=0.1)
    assert excinfo.value.detail == "The prompt was blocked by content policy (category: graphic_violence)"


# -- a server with its own policy, an image classifier, and a model that breaks on one character -----


def save_always_nsfw_classifier(path) -> str:
    """A tiny real image-classification model (ViT) whose answer is always "nsfw" (p ≈ 0.98)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 4.0]))
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def save_model_that_breaks_on_tilde(path):
    """The tiny model with the T5 embedding of "~" set to NaN: prompts with "~" give NaN images."""
    from fluxserve.engine.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    token = pipe.tokenizer_2.convert_tokens_to_ids("~")
    with torch.no_grad():
        pipe.text_encoder_2.get_input_embeddings().weight[token] = float("nan")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """The app loading its own model (the package's loader) and moderation settings."""
    root = tmp_path_factory.mktemp("strict")
    blocklist = root / "blocklist.txt"
    blocklist.write_text("[weather]\nthunder*\n[animals]\nwalrus\n")
    with running_app(
        root / "data",
        model=str(save_model_that_breaks_on_tilde(root / "model")),
        moderation_blocklist=str(blocklist),
        moderation_categories="weather",
        moderation_image_classifier=save_always_nsfw_classifier(root / "classifier"),
    ) as app:
        yield app


def run_v1(srv, prompt: str) -> httpx.Response:
    with srv.http() as http:
        return http.post(f"/v1/{SLUG}", json={"positivePrompt": prompt, **SMALL})


def test_configured_blocklist_and_categories(strict_server):
    blocked = run_v1(strict_server, "Thunderstorm over the bay")
    assert blocked.status_code == 422
    assert blocked.json()["error"] == "The prompt was blocked by content policy (category: weather)"
    # "animals" is in the file but not enforced; the built-in list is replaced, not added to.
    for prompt in ("a walrus", "a gory battlefield"):
        response = run_v1(strict_server, prompt)
        assert response.status_code == 422 and "The generated image" in response.json()["error"], prompt


def test_image_classifier_blocks_and_nothing_is_stored(strict_server):
    response = run_v1(strict_server, "a lighthouse at dusk")
    assert response.status_code == 422
    assert response.json()["error"] == "The generated image was blocked by content policy (category: nsfw)"
    assert not list((strict_server.data_dir / "outputs").iterdir())


def test_nan_image_is_a_clear_failure_and_the_worker_goes_on(strict_server):
    response = run_v1(strict_server, "a lighthouse ~ at dusk")
    assert response.status_code == 422
    assert "invalid image (NaN" in response.json()["error"]
    # The next job runs through generation again (and reaches the image check).
    assert "The generated image" in run_v1(strict_server, "a lighthouse at dusk").json()["error"]
