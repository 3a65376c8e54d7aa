"""Browser safety and HTTP semantics of the real app (in-process, fake engine): only JSON bodies (415),
only expected Host headers while open (421, against DNS rebinding), CORS off unless configured,
security headers (CSP without inline script) on every response, offline /docs, 405 with `Allow`,
and HEAD wherever GET works."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fluxserve.engine.fake import SleepingEngine

from support.accounts import create_key
from support.app import SLUG, running_app, serve_on_loopback, wait_status
from support.faults import fail_submits_on

TINY = {"positivePrompt": "a cat", "width": 128, "height": 128, "steps": 1}
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def fake_app(data_dir: Path, **settings):
    return running_app(data_dir, engine=SleepingEngine(0.0), **settings)


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    """Keys off (loopback bind, no key yet): the mode a browser on the same machine can reach."""
    with fake_app(tmp_path_factory.mktemp("open"), public_url="https://images.example.org:8443") as app:
        yield app


@pytest.fixture()
def http(open_app):
    with open_app.http() as client:
        yield client


# -- 1a. JSON bodies only ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     None],
)
def test_a_body_that_is_not_declared_json_is_415(http, content_type):
    """What a cross-site page can send without a CORS preflight (text/plain, forms, an untyped blob)."""
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(f"/v2/{SLUG}", content=b'{"positivePrompt": "a cat", "steps": 1}', headers=headers)
    assert response.status_code == 415, response.text
    assert set(response.json()) == {"error"} and "application/json" in response.json()["error"]


def test_json_with_a_charset_is_accepted_and_bodyless_posts_need_no_type(http):
    response = http.post(f"/v2/{SLUG}", content=b'{"positivePrompt": "a cat", "steps": 1, "width": 128, "height": 128}',
                         headers={"content-type": "Application/JSON; charset=UTF-8"})
    assert response.status_code == 200, response.text
    assert http.post(f"/v2/requests/{UNKNOWN_ID}/cancel").status_code == 404


# -- 1b. allowed hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "images.example.org.evil"]
)
def test_open_server_refuses_unknown_hosts_with_421(http, host):
    """DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    for method, path in (("GET", "/health"), ("POST", f"/v2/{SLUG}"), ("GET", "/")):
        response = http.request(method, path, headers={"host": host}, json=TINY if method == "POST" else None)
        assert response.status_code == 421, (method, path, response.text)
        assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:1234", "[::1]", "[::1]:8000",
             "images.example.org", "images.example.org:8443"],
)
def test_open_server_answers_loopback_names_and_its_public_host(http, host):
    assert http.get("/health", headers={"host": host}).status_code == 200


def test_server_with_keys_answers_any_host_unless_told(tmp_path):
    create_key(tmp_path, "alice")
    with fake_app(tmp_path) as app, app.http() as http:
        assert http.get("/health", headers={"host": "api.example.com"}).status_code == 200
    with (fake_app(tmp_path, allowed_hosts="127.0.0.1, api.example.com, other.example:9000") as app,
          app.http() as http):
        assert http.get("/health", headers={"host": "api.example.com:443"}).status_code == 200
        assert http.get("/health", headers={"host": "other.example:9000"}).status_code == 200
        assert http.get("/health", headers={"host": "other.example:9001"}).status_code == 421
        assert http.get("/health", headers={"host": "localhost"}).status_code == 421


def test_allowed_hosts_star_opens_an_open_server_to_any_host(tmp_path):
    with fake_app(tmp_path, allowed_hosts="*") as app, app.http() as http:
        assert http.get("/health", headers={"host": "anything.example"}).status_code == 200


def test_bind_address_is_an_allowed_host(tmp_path):
    with fake_app(tmp_path, host="10.1.2.3", auth="off") as app, app.http() as http:
        assert http.get("/health", headers={"host": "10.1.2.3:8000"}).status_code == 200
        assert http.get("/health", headers={"host": "10.1.2.4:8000"}).status_code == 421


# -- 1c. CORS ------------------------------------------------------------------------------------


def preflight(http, origin: str):
    return http.options(f"/v2/{SLUG}", headers={
        "origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type",
    })


def test_cors_is_off_by_default(http):
    assert "access-control-allow-origin" not in preflight(http, "https://app.example").headers
    response = http.get("/health", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_origins_turn_cors_on_for_those_origins(tmp_path):
    with fake_app(tmp_path, cors_origins="https://app.example, https://other.example") as app, app.http() as http:
        allowed = preflight(http, "https://app.example")
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        response = http.post(f"/v2/{SLUG}", json=TINY, headers={"origin": "https://other.example"})
        assert response.headers["access-control-allow-origin"] == "https://other.example"
        assert "access-control-allow-origin" not in preflight(http, "https://evil.example").headers


# -- 2. security headers, offline docs -----------------------------------------------------------


def csp_of(response) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    return {d.split()[0]: d.partition(" ")[2] for d in (part.strip() for part in policy.split(";")) if d}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/", {}, 200),
        ("GET", "/playground/app.js", {}, 200),
        ("GET", "/health", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        ("GET", "/docs", {}, 200),
        ("GET", "/nowhere", {}, 404),
        ("PUT", "/health", {}, 405),
        ("POST", f"/v2/{SLUG}", {"content-type": "text/plain"}, 415),
        ("GET", "/health", {"host": "evil.example"}, 421),
    ],
)
def test_every_response_carries_the_security_headers(http, method, path, headers, status):
    response = http.request(method, path, headers=headers, content=b"{}" if method == "POST" else None)
    assert response.status_code == status
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    csp = csp_of(response)
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response.headers["content-security-policy"]


def test_an_internal_error_carries_them_too(tmp_path):
    """A 500 is answered by Starlette's outermost middleware, outside the one that adds the headers."""
    with fake_app(tmp_path, setup=lambda services: fail_submits_on(services, "__fault__")) as app, app.http() as http:
        response = http.post(f"/v2/{SLUG}", json={**TINY, "positivePrompt": "a __fault__"})
        assert response.status_code == 500 and set(response.json()) == {"error"}
        assert csp_of(response)["script-src"] == "'self'"
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value


def test_docs_page_works_offline(http):
    page = http.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert "<script>" not in html and "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        assert asset.startswith("/"), asset
        response = http.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["content-type"].split(";")[0] in ("text/javascript", "text/css", "image/png")
    assert http.get("/redoc").status_code == 404


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_pages_load_in_a_browser_without_csp_violations(open_app):
    """The playground and Swagger UI under the CSP: no inline script, style or handler is refused."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    record_violations = """
        window.__violations = [];
        document.addEventListener('securitypolicyviolation',
            e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
    """
    with serve_on_loopback(open_app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.add_init_script(record_violations)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            failed: list[str] = []
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 and "favicon" not in r.url else None)

            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert page.locator("#scheduler option").count() > 1
            assert page.evaluate("() => window.__violations") == []

            page.goto(url + "/docs")
            page.wait_for_selector(f".opblock-summary-path[data-path='/v2/{SLUG}']", timeout=30_000)
            assert page.evaluate("() => window.__violations") == []
            assert errors == [] and failed == []
        finally:
            browser.close()


# -- 3. HTTP semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/account", {"GET", "HEAD"}),
        ("DELETE", f"/v2/requests/{UNKNOWN_ID}", {"GET", "HEAD"}),
        ("POST", f"/v2/requests/{UNKNOWN_ID}/status", {"GET", "HEAD"}),
        ("GET", f"/v2/requests/{UNKNOWN_ID}/cancel", {"POST"}),
        ("GET", f"/v1/{SLUG}", {"POST"}),
        ("PATCH", f"/v2/{SLUG}", {"POST"}),
        ("POST", "/health", {"GET", "HEAD"}),
        ("DELETE", "/", {"GET", "HEAD"}),
        ("OPTIONS", "/metrics", {"GET", "HEAD"}),
    ],
)
def test_a_wrong_method_is_405_with_allow(http, method, path, allow):
    response = http.request(method, path)
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allow
    assert set(response.json()) == {"error"}


def test_unknown_paths_and_models_stay_404(http):
    assert http.put("/nowhere").status_code == 404
    assert http.post("/v2/no-such-model", json=TINY).json() == {"error": "Model not found: no-such-model"}


@pytest.mark.parametrize("path", ["/health", "/", "/playground/config.json", "/openapi.json", "/docs", "/metrics",
                                  f"/v2/requests/{UNKNOWN_ID}/status", "/nowhere"])
def test_head_answers_as_get_without_a_body(http, path):
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code
    assert head.content == b""
    assert head.headers.get("content-type") == got.headers.get("content-type")
    if path not in ("/health", "/metrics"):  # their bodies change from call to call
        assert head.headers.get("content-length") == got.headers.get("content-length")


def test_head_on_a_finished_event_stream(http):
    request_id = http.post(f"/v2/{SLUG}", json=TINY).json()["request_id"]
    wait_status(http, request_id)
    head = http.head(f"/v2/requests/{request_id}/events")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")
