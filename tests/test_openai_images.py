"""OpenAI's Images API (`POST /v1/images/generations`, `GET /v1/models`) driven by the official `openai`
package with only its `base_url` changed: images as `b64_json` and as `url`, `n` images with seeds
seed, seed+1, ..., OpenAI-shaped errors (and the exceptions the client raises for them), keys, credits
and idempotency as on v2, and the README's example run as written."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from support.accounts import create_key
from support.app import SLUG, running_app, serve_on_loopback, shared_engine

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = {"steps": 2}
BLOCKED = "close-up of a beheading"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, tiny_model):
    """The app with keys off, on a loopback port: its base URL."""
    with running_app(tmp_path_factory.mktemp("openai-open"), engine=shared_engine(tiny_model)) as srv, \
            serve_on_loopback(srv) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model):
    """The app with keys on (one key exists): (base URL, data dir)."""
    data_dir = tmp_path_factory.mktemp("openai-keyed")
    create_key(data_dir, "first", credits=1)
    with running_app(data_dir, engine=shared_engine(tiny_model)) as srv, serve_on_loopback(srv) as url:
        yield url, data_dir


def client(url: str, key: str = "not-checked", **options) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, **options)


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_two_images_as_b64_json(open_server):
    result = client(open_server).images.generate(
        prompt="a lighthouse at dusk", n=2, size="256x256", response_format="b64_json",
        extra_body={"seed": 7, **FAST})
    assert isinstance(result.created, int) and len(result.data) == 2
    images = [base64.b64decode(image.b64_json) for image in result.data]
    assert [image_of(data).size for data in images] == [(256, 256), (256, 256)]
    assert [image_of(data).format for data in images] == ["PNG", "PNG"]
    assert images[0] != images[1]
    assert [image.model_extra["seed"] for image in result.data] == [7, 8]
    assert result._request_id == result.data[0].model_extra["request_id"]
    assert result.size == "256x256" and result.output_format == "png" and result.model_extra["model"] == SLUG

    # n images are n jobs with seeds seed, seed+1: one image at seed 8 is the second of them.
    single = client(open_server).images.generate(prompt="a lighthouse at dusk", size="256x256",
                                                  response_format="b64_json", extra_body={"seed": 8, **FAST})
    assert base64.b64decode(single.data[0].b64_json) == images[1]


def test_two_images_as_urls(open_server):
    result = client(open_server).images.generate(
        model=SLUG, prompt="a fox in snow", n=2, size="256x256", response_format="url", output_format="webp",
        user="someone", quality="high", extra_body={"seed": 3, "guidance": 3.5, "scheduler": "Euler", **FAST})
    assert len(result.data) == 2 and all(image.b64_json is None for image in result.data)
    for image in result.data:
        assert image.url.startswith(f"{open_server}/v2/media/") and image.url.endswith(".webp")
        fetched = httpx.get(image.url, timeout=30)  # an absolute link, fetched as given
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        assert image_of(fetched.content).size == (256, 256)


def test_nulls_are_not_given_and_size_auto(open_server):
    response = httpx.post(f"{open_server}/v1/images/generations", timeout=60, json={
        "prompt": "a boat", "model": None, "n": None, "size": "auto", "response_format": "b64_json",
        "quality": None, "style": None, "steps": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "1024x1024" and len(body["data"]) == 1
    assert image_of(base64.b64decode(body["data"][0]["b64_json"])).size == (1024, 1024)
    assert response.headers["x-request-id"] == body["data"][0]["request_id"]


@pytest.mark.parametrize(("arguments", "error", "param", "code"), [
    ({"size": "100x100"}, openai.BadRequestError, "size", "invalid_value"),
    ({"size": "large"}, openai.BadRequestError, "size", "invalid_value"),
    ({"n": 5}, openai.BadRequestError, "n", "invalid_value"),
    ({"response_format": "png"}, openai.BadRequestError, "response_format", "invalid_value"),
    ({"output_format": "gif"}, openai.BadRequestError, "output_format", "invalid_value"),
    ({"background": "transparent"}, openai.BadRequestError, "background", "unsupported_value"),
    ({"extra_body": {"steps": 500}}, openai.BadRequestError, "steps", "invalid_value"),
    ({"extra_body": {"guidance": "high"}}, openai.BadRequestError, "guidance", "invalid_value"),
    ({"extra_body": {"negative_prompt": "x"}}, openai.BadRequestError, "negative_prompt", "unknown_parameter"),
    ({"extra_body": {"loras": [{"name": "not-registered"}]}}, openai.BadRequestError, "loras", "invalid_value"),
    ({"model": "dall-e-3"}, openai.NotFoundError, "model", "model_not_found"),
])
def test_errors_are_openai_shaped(open_server, arguments, error, param, code):
    api = client(open_server, max_retries=0)
    with pytest.raises(error) as raised:
        api.images.generate(prompt="a cat", **arguments)
    assert raised.value.param == param and raised.value.code == code
    assert raised.value.type in ("invalid_request_error",)
    assert raised.value.message.startswith(f"Error code: {raised.value.status_code} - ")
    assert set(raised.value.body) == {"message", "type", "param", "code"}


def test_streaming_is_declined_and_a_missing_prompt_named(open_server):
    api = client(open_server, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="streaming not supported"):
        api.images.generate(prompt="a cat", stream=True)
    response = httpx.post(f"{open_server}/v1/images/generations", json={"n": 1}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Missing required parameter: 'prompt'.",
                                        "type": "invalid_request_error", "param": "prompt",
                                        "code": "missing_required_parameter"}
    bad_json = httpx.post(f"{open_server}/v1/images/generations", content=b"{", timeout=30,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"


def test_a_blocked_prompt_is_a_content_policy_violation(open_server):
    with pytest.raises(openai.BadRequestError) as raised:
        client(open_server, max_retries=0).images.generate(prompt=BLOCKED, size="256x256", extra_body=FAST)
    assert raised.value.code == "content_policy_violation" and "blocked by content policy" in raised.value.message


def test_models_list_in_openai_shape(open_server):
    models = list(client(open_server).models.list())
    assert [model.id for model in models] == [SLUG]
    assert models[0].object == "model" and models[0].owned_by == "fluxserve" and isinstance(models[0].created, int)
    assert models[0].model_extra["parameters"]["properties"]["positivePrompt"]["type"] == "string"
    assert client(open_server).models.retrieve(SLUG).id == SLUG


def test_keys_are_required_and_each_image_is_charged(keyed):
    url, data_dir = keyed
    key = create_key(data_dir, "openai-user", credits=10).key
    with pytest.raises(openai.AuthenticationError) as raised:
        client(url, "fsk_not_a_key", max_retries=0).images.generate(prompt="a cat", size="256x256")
    assert raised.value.code == "invalid_api_key"
    no_key = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"

    result = client(url, key).images.generate(prompt="a cat", n=2, size="256x256", response_format="url",
                                              extra_body=FAST)
    # A keyed job's media link is signed: it opens without the key.
    assert httpx.get(result.data[0].url, timeout=30).status_code == 200
    account = httpx.get(f"{url}/v1/account", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert account["balance"] == 8 and account["reserved"] == 0


def test_credits_short_is_insufficient_quota_and_nothing_is_charged(keyed):
    url, data_dir = keyed
    key = create_key(data_dir, "one-credit", credits=1).key
    sent: list[httpx.Request] = []
    counting = httpx.Client(event_hooks={"request": [sent.append]}, timeout=60)
    with pytest.raises(openai.RateLimitError) as raised:
        client(url, key, http_client=counting).images.generate(prompt="a cat", n=2, size="256x256", extra_body=FAST)
    assert raised.value.code == "insufficient_quota" and raised.value.type == "insufficient_quota"
    assert len(sent) == 1  # x-should-retry: false: the client did not back off and retry
    account = httpx.get(f"{url}/v1/account", headers={"x-api-key": key}, timeout=30).json()
    assert account["balance"] == 1 and account["reserved"] == 0  # the first image's job was cancelled


def test_a_key_limited_to_other_models_is_denied(keyed):
    url, data_dir = keyed
    key = create_key(data_dir, "elsewhere", credits=5, models=("another-model",)).key
    with pytest.raises(openai.PermissionDeniedError, match=f"not allowed to use the model {SLUG}"):
        client(url, key, max_retries=0).images.generate(prompt="a cat", size="256x256")


def test_an_idempotency_key_gives_the_same_images_charged_once(keyed):
    url, data_dir = keyed
    key = create_key(data_dir, "retrier", credits=10).key
    api = client(url, key)
    first, second = (api.images.generate(prompt="a cat", n=2, size="256x256", response_format="b64_json",
                                          extra_body=FAST, extra_headers={"Idempotency-Key": "order-17"})
                     for _ in range(2))
    ids = [[image.model_extra["request_id"] for image in result.data] for result in (first, second)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 2
    assert [image.b64_json for image in first.data] == [image.b64_json for image in second.data]
    account = httpx.get(f"{url}/v1/account", headers={"x-api-key": key}, timeout=30).json()
    assert account["balance"] == 8
    with pytest.raises(openai.ConflictError):  # the same key with another request
        api.with_options(max_retries=0).images.generate(prompt="a dog", n=2, size="256x256", extra_body=FAST,
                                                        extra_headers={"Idempotency-Key": "order-17"})


def readme_example() -> str:
    """The Python block of the README's OpenAI section."""
    text = README.read_text()
    section = text.split("## OpenAI images API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "no python example in the README's OpenAI section"
    return blocks[0]


def test_the_readme_example_works_as_written(open_server, tmp_path):
    code = readme_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("http://127.0.0.1:8000", open_server))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = sorted(tmp_path.glob("*.png"))
    assert len(written) >= 2 and all(image_of(path.read_bytes()).format == "PNG" for path in written)
    assert f"{open_server}/v2/media/" in done.stdout
