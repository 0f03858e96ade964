"""The web dashboard and chat playground, in real headless Chromium.

One gateway (admin token "t", a fixed data-plane port so the playground relay
can reach it) in front of a simulator that paces its tokens, so a streamed
reply takes about a second and can be watched growing. Selenium drives
Debian's chromium through its chromedriver; nothing is downloaded at run time
(the driver path and the browser binary are given, so selenium-manager stays
idle). The routes the pages use are also checked over plain HTTP.

Screenshots go to pytest's temporary folder; with OLLAMAMQ_UPDATE_SCREENSHOTS=1
they replace docs/screenshots/{dashboard,playground,usage}.png (the README shows the first two).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from harness import Stack, fast_sim_options, free_port, start_stack

from ollamamq_fast.operator import key_digest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver (.ci/run does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.timeout(45)

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "llama3.2:latest"
# 40 tokens at 20/s: a reply streams for about 2 s, long enough to watch it
# grow and to stop it halfway.
SIM = fast_sim_options(tokens_per_s=20.0, tokens=40)
# What Chromium needs to run as root in a container with no network (see
# .library/env/machines/python.md): no sandbox, no GPU, no background fetches.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = start_stack(sims=[SIM], admin_port=0, admin_token=TOKEN, port=free_port())
    try:
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def admin_url(stack: Stack) -> str:
    assert stack.gateway.admin_port, "the control plane did not start"
    return f"http://127.0.0.1:{stack.gateway.admin_port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="omq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("OLLAMAMQ_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


def wait_for(driver: WebDriver, check: Callable[[], T | None], what: str,
             timeout: float = 8.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    def probe(_: WebDriver) -> T | None:
        try:
            return check()
        except StaleElementReferenceException:  # a row re-rendered mid-read
            return None
    result = WebDriverWait(driver, timeout, poll_frequency=0.05).until(probe, f"timed out: {what}")
    assert result is not None  # until() returns only a truthy value
    return result


def generate(stack: Stack, user: str, tokens: int = 4) -> None:
    r = httpx.post(stack.url + "/api/generate", headers={"X-User-ID": user}, timeout=10,
                   json={"model": MODEL, "prompt": f"hello from {user}", "stream": False,
                         "options": {"num_predict": tokens}})
    assert r.status_code == 200, r.text


def sign_in(driver: WebDriver, admin_url: str, path: str = "/") -> None:
    """Open a page signed in (the token lives in the tab's sessionStorage)."""
    driver.get(admin_url + path)
    app = driver.find_element(By.ID, "app")
    token_input = driver.find_element(By.ID, "token-input")
    wait_for(driver, lambda: app.is_displayed() or token_input.is_displayed(), "a page state")
    if not app.is_displayed():
        token_input.send_keys(TOKEN)
        driver.find_element(By.ID, "login-button").click()
        wait_for(driver, app.is_displayed, "the signed-in page")


def row(driver: WebDriver, attr: str, key: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR, f'tr[{attr}="{key}"]')
    return found[0] if found else None


def on_loop(stack: Stack, fn: Callable[[], T]) -> T:
    result: T = stack.lt.call(fn)
    return result


# -- In the browser -----------------------------------------------------------------


def test_sign_in_refuses_a_wrong_token_then_shows_the_backend(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    browser.get(admin_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(admin_url + "/")
    app, error = browser.find_element(By.ID, "app"), browser.find_element(By.ID, "login-error")
    token_input = browser.find_element(By.ID, "token-input")
    wait_for(browser, token_input.is_displayed, "the sign-in form")
    token_input.send_keys("not-the-token")
    browser.find_element(By.ID, "login-button").click()
    wait_for(browser, error.is_displayed, "the wrong-token message")
    assert "Wrong admin token" in error.text
    assert not app.is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0

    token_input.send_keys(TOKEN)
    browser.find_element(By.ID, "login-button").click()
    wait_for(browser, app.is_displayed, "the dashboard")
    assert not error.is_displayed()
    sim_url = stack.sims[0].url
    backend = wait_for(browser, lambda: row(browser, "data-backend", sim_url), "the sim's backend")
    wait_for(browser, lambda: backend.find_element(By.CSS_SELECTOR, ".state").text == "online",
             "the backend online")
    assert "ollama" in backend.text and "/ 4" in backend.text
    # The event stream is up (?token= on /api/events) and ticks fill the tiles.
    wait_for(browser, lambda: browser.find_element(By.ID, "live-status").text == "live",
             "the live event stream")
    wait_for(browser, lambda: browser.find_element(By.ID, "tile-uptime").text != "–", "stats")


def test_vip_toggle_changes_the_marker_and_the_queue(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    generate(stack, "web-vip")
    sign_in(browser, admin_url)
    user_row = wait_for(browser, lambda: row(browser, "data-user", "web-vip"), "the user's row",
                        timeout=6)
    vip = user_row.find_element(By.CSS_SELECTOR, '[data-action="vip"]')
    markers = user_row.find_element(By.CSS_SELECTOR, ".markers")
    assert vip.get_attribute("aria-pressed") == "false" and "VIP" not in markers.text
    assert not on_loop(stack, lambda: stack.state.dispatcher.queue.is_vip("web-vip"))

    vip.click()
    wait_for(browser, lambda: "VIP" in markers.text, "the VIP marker")
    assert vip.get_attribute("aria-pressed") == "true"
    assert on_loop(stack, lambda: stack.state.dispatcher.queue.is_vip("web-vip"))
    assert "web-vip: VIP on" in browser.find_element(By.ID, "event-log").text

    vip.click()
    wait_for(browser, lambda: "VIP" not in markers.text, "the VIP marker gone")
    assert not on_loop(stack, lambda: stack.state.dispatcher.queue.is_vip("web-vip"))


def test_limits_dialog_sets_and_drops_an_override(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    generate(stack, "web-limits")
    sign_in(browser, admin_url)
    user_row = wait_for(browser, lambda: row(browser, "data-user", "web-limits"), "the user's row",
                        timeout=6)

    def overrides() -> dict[str, Any]:
        return dict(on_loop(stack, lambda: stack.state.operator.limits("web-limits"))["overrides"])

    def edit(name: str, value: str) -> None:
        user_row.find_element(By.CSS_SELECTOR, '[data-action="limits"]').click()
        dialog = browser.find_element(By.ID, "limits-dialog")
        wait_for(browser, dialog.is_displayed, "the limits dialog")
        field = dialog.find_element(By.ID, f"limit-{name}")
        field.clear()
        if value:
            field.send_keys(value)
        browser.find_element(By.ID, "limits-save").click()
        wait_for(browser, lambda: not dialog.is_displayed(), "the dialog closed")

    edit("rate", "2.5")
    wait_for(browser, lambda: overrides() == {"rate": 2.5}, "the rate override")
    edit("rate", "")
    wait_for(browser, lambda: overrides() == {}, "the override dropped")


def test_key_secret_shown_once_then_revoked(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    sign_in(browser, admin_url)
    browser.find_element(By.ID, "key-user").send_keys("web-key")
    browser.find_element(By.ID, "key-name").send_keys("ci")
    browser.find_element(By.CSS_SELECTOR, '#create-key button[type="submit"]').click()
    secret = browser.find_element(By.ID, "key-secret-value")
    wait_for(browser, lambda: secret.text.startswith("omq-"), "the new secret")
    keys = on_loop(stack, stack.state.operator.list_keys)
    key_id = next(k["key_id"] for k in keys if k["user"] == "web-key")
    # The secret works on the data plane's key lookup, and leaves the page on Done.
    digest = key_digest(secret.text)
    assert on_loop(stack, lambda: stack.state.cache.key_by_digest(digest)).user == "web-key"
    browser.find_element(By.ID, "key-secret-close").click()
    assert not browser.find_element(By.ID, "key-secret").is_displayed()
    assert browser.execute_script("return document.getElementById('key-secret-value').textContent") == ""

    key_row = wait_for(browser, lambda: row(browser, "data-key", key_id), "the key's row")
    key_row.find_element(By.CSS_SELECTOR, '[data-action="revoke"]').click()
    browser.switch_to.alert.accept()  # "Revoke key ...?"
    wait_for(browser, lambda: "revoked" in key_row.find_element(By.CSS_SELECTOR, ".status").text,
             "the revoked status")
    assert next(k for k in on_loop(stack, stack.state.operator.list_keys)
                if k["key_id"] == key_id)["revoked"] is True
    assert on_loop(stack, lambda: stack.state.cache.key_by_digest(digest)) is None


def test_drain_and_undrain_a_backend_from_the_page(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    sign_in(browser, admin_url)
    sim_url = stack.sims[0].url
    backend = wait_for(browser, lambda: row(browser, "data-backend", sim_url), "the backend row")
    button = backend.find_element(By.CSS_SELECTOR, '[data-action="drain"]')
    state = backend.find_element(By.CSS_SELECTOR, ".state")

    def draining() -> bool:
        return bool(on_loop(stack, lambda: stack.state.fleet.find(sim_url).draining))

    assert button.text == "Drain" and not draining()
    button.click()
    wait_for(browser, lambda: state.text == "draining", "the draining state")
    assert draining() and button.text == "Undrain"
    button.click()
    wait_for(browser, lambda: state.text == "online", "the backend back online")
    assert not draining()


def _direct_chat(stack: Stack, messages: list[dict[str, str]]) -> str:
    """A non-stream chat straight to the data plane (user "direct"): its reply text."""
    r = httpx.post(stack.url + "/api/chat", timeout=10, headers={"X-User-ID": "direct"},
                   json={"model": MODEL, "stream": False, "messages": messages})
    assert r.status_code == 200, r.text
    return str(r.json()["message"]["content"])


def _in_thread(fn: Callable[..., T], *args: Any) -> Future[T]:
    """`fn(*args)` run in a thread of its own; the future gives its result or raises."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def test_playground_streams_the_reply_token_by_token(
        stack: Stack, admin_url: str, browser: WebDriver, shots: Path) -> None:
    sign_in(browser, admin_url, "/playground")
    model = Select(browser.find_element(By.ID, "model"))
    wait_for(browser, lambda: MODEL in [o.get_attribute("value") for o in model.options],
             "the model list")
    model.select_by_value(MODEL)
    identity = browser.find_element(By.ID, "identity")
    identity.clear()
    identity.send_keys("web-chat")
    question = "Why is the sky blue?"
    browser.find_element(By.ID, "message").send_keys(question)
    browser.find_element(By.ID, "send").click()
    # The same conversation straight to the data plane, compared below: sent
    # while the page streams (each reply takes about 2 s), not after it.
    direct = _in_thread(_direct_chat, stack, [{"role": "user", "content": question}])

    # Sample the reply as it streams: it must grow in several steps, not
    # appear at once.
    read = ("const m = document.querySelector('#conversation .msg.assistant:last-of-type');"
            "return m && [m.dataset.state, m.querySelector('.content').textContent];")
    lengths: list[int] = []
    deadline = time.monotonic() + 15
    state, text = "waiting", ""
    while time.monotonic() < deadline:
        state, text = browser.execute_script(read) or ("waiting", "")
        if state == "streaming" and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        if state in ("done", "error"):
            break
        time.sleep(0.03)
    assert state == "done", text
    assert len(lengths) >= 4 and lengths == sorted(lengths), lengths

    # The same conversation straight to the data plane gives the same text:
    # the page showed exactly what the simulator produced.
    assert text == direct.result(15) and text
    meta = browser.find_element(By.CSS_SELECTOR, "#conversation .msg.assistant .meta").text
    assert f"{SIM.tokens} tokens" in meta
    # A follow-up carries the conversation so far.
    follow_up = "And why are sunsets red?"
    browser.find_element(By.ID, "message").send_keys(follow_up)
    browser.find_element(By.ID, "send").click()
    direct = _in_thread(_direct_chat, stack, [{"role": "user", "content": question},
                                              {"role": "assistant", "content": text},
                                              {"role": "user", "content": follow_up}])
    wait_for(browser, lambda: len(browser.find_elements(
        By.CSS_SELECTOR, '#conversation .msg.assistant[data-state="done"]')) == 2, "the second reply")
    second = browser.find_elements(By.CSS_SELECTOR, "#conversation .msg.assistant .content")[1].text
    assert second == direct.result(15) and second != text
    # Both went through the gateway's queue as the chosen user.
    users = {u["user"]: u for u in on_loop(stack, stack.state.operator.list_users)}
    assert users["web-chat"]["done"] == 2
    browser.save_screenshot(str(shots / "playground.png"))


def test_stop_button_cancels_the_reply_in_the_gateway(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    sign_in(browser, admin_url, "/playground")
    browser.find_element(By.ID, "reset").click()
    Select(browser.find_element(By.ID, "model")).select_by_value(MODEL)
    identity = browser.find_element(By.ID, "identity")
    identity.clear()
    identity.send_keys("web-stop")
    browser.find_element(By.ID, "message").send_keys("Tell me a long story")
    browser.find_element(By.ID, "send").click()
    reply = wait_for(browser, lambda: browser.find_element(
        By.CSS_SELECTOR, '#conversation .msg.assistant[data-state="streaming"]'), "the stream")
    wait_for(browser, lambda: reply.find_element(By.CSS_SELECTOR, ".content").text, "a token")
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda: reply.get_attribute("data-state") == "stopped", "the stopped reply")
    # The relay hung up on the data plane: the gateway counts the request as
    # dropped and its backend slot is free again, long before the reply's end.
    wait_for(browser, lambda: on_loop(stack, lambda: next(
        u for u in stack.state.operator.list_users() if u["user"] == "web-stop"))["dropped"] == 1,
        "the dropped request", timeout=3)
    assert on_loop(stack, lambda: stack.state.fleet.find(stack.sims[0].url).in_flight) == 0
    assert browser.find_element(By.ID, "send").is_enabled()


def test_dashboard_screenshot_with_traffic(
        stack: Stack, admin_url: str, browser: WebDriver, shots: Path) -> None:
    """Charts fed by live ticks while users join one by one; then a screenshot."""
    sign_in(browser, admin_url)
    stop = threading.Event()

    def traffic(user: str) -> None:
        while not stop.is_set():
            generate(stack, user, tokens=8)

    # More senders than the backend's 4 slots, so the queue shows too.
    senders = ["alice", "bob", "carol", "dave", "erin", "alice", "bob", "frank"]
    threads = [threading.Thread(target=traffic, args=(u,), daemon=True) for u in senders]
    try:
        # Updating the README's screenshot: users join slower and the charts
        # gather a few more seconds of history (the test itself needs neither).
        updating = os.environ.get("OLLAMAMQ_UPDATE_SCREENSHOTS") == "1"
        for t in threads:
            t.start()
            time.sleep(0.8 if updating else 0.3)
        # Operator changes while the page watches: they show in the tables
        # and in the change log.
        with httpx.Client(base_url=admin_url, headers=AUTH, timeout=5) as admin:
            admin.patch("/api/users/alice", json={"vip": True})
            admin.patch("/api/users/bob", json={"weight": 3})
            admin.post("/api/users/mallory/block")
            admin.post("/api/blocked/ips", json={"ip": "203.0.113.0/24"})
            admin.post("/api/keys", json={"user": "carol", "name": "laptop"})
        if updating:
            time.sleep(3)
        wait_for(browser, lambda: row(browser, "data-user", "frank"), "the last user")
        wait_for(browser, lambda: "laptop" in browser.find_element(By.ID, "keys-table").text,
                 "the new key")
        canvas = browser.find_element(By.ID, "chart-tps")
        drawn = ("const c = arguments[0]; const d = c.getContext('2d')"
                 ".getImageData(0, 0, c.width, c.height).data;"
                 "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;")
        # The chart is drawn from the live ticks (one a second): wait until it shows them.
        wait_for(browser, lambda: browser.execute_script(drawn, canvas) > 2000,
                 "the tokens/s chart drawn")
        wait_for(browser, lambda: "mallory blocked" in browser.find_element(By.ID, "event-log").text,
                 "the block in the change log")
        browser.set_window_size(1400, 1800)
        browser.save_screenshot(str(shots / "dashboard.png"))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        browser.set_window_size(1400, 1000)
    assert (shots / "dashboard.png").stat().st_size > 20_000


# -- The routes the pages use, over plain HTTP ----------------------------------------


def test_pages_need_no_token_but_the_api_does(admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, timeout=5) as anonymous:
        for path in ("/", "/playground", "/static/dashboard.js", "/static/style.css"):
            r = anonymous.get(path)
            assert r.status_code == 200, path
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        page = anonymous.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert anonymous.get("/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
        # Unknown files and paths outside static/ learn nothing without the token.
        for path in ("/static/nope.js", "/static/../app.py", "/static/", "/api/info",
                     "/api/playground/models", "/api/users/alice/limits"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.post("/api/playground/chat", json={}).status_code == 401
        assert anonymous.post("/", content=b"").status_code == 401


def test_event_stream_takes_the_token_in_the_query_only(admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, timeout=5) as anonymous:
        assert anonymous.get("/api/events", params={"token": "wrong"}).status_code == 401
        assert anonymous.get("/api/events", params={"token": ""}).status_code == 401
        assert anonymous.get("/api/events?token=t&token=t").status_code == 401
        # Every other route insists on the header.
        assert anonymous.get("/api/stats", params={"token": TOKEN}).status_code == 401
        with anonymous.stream("GET", "/api/events", params={"token": TOKEN}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            for line in r.iter_lines():
                if line.startswith("event: tick"):
                    break


def test_info_models_and_chat_errors(stack: Stack, admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, headers=AUTH, timeout=10) as admin:
        info = admin.get("/api/info").json()
        assert info["data_plane_url"] == stack.url
        assert info["data_plane_port"] == stack.port
        models = admin.get("/api/playground/models").json()
        assert MODEL in models["models"] and set(models["loaded"]) <= set(models["models"])
        for body in ({}, {"model": MODEL}, {"model": MODEL, "messages": []},
                     {"model": "", "messages": [{"role": "user", "content": "q"}]},
                     {"model": MODEL, "messages": [{"role": "robot", "content": "q"}]},
                     {"model": MODEL, "messages": [{"role": "user", "content": "q"}],
                      "user": "a\r\nX-Evil: 1"},
                     {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "x": 1}):
            r = admin.post("/api/playground/chat", json=body)
            assert r.status_code == 400, (body, r.text)
        # The data plane's refusal comes back with its status, marked as its own.
        r = admin.post("/api/playground/chat", json={
            "model": "no-such-model", "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 404 and r.json()["source"] == "data plane", r.text
        # A streamed chat relayed as NDJSON, ending with Ollama's final chunk.
        with admin.stream("POST", "/api/playground/chat", json={
                "model": MODEL, "user": "relay", "messages": [{"role": "user", "content": "q"}]}) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            chunks = [json.loads(line) for line in r.iter_lines() if line]
        assert chunks[-1]["done"] is True and chunks[-1]["eval_count"] == SIM.tokens
        assert len(chunks) == SIM.tokens + 1


def test_limits_round_trip(stack: Stack, admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, headers=AUTH, timeout=5) as admin:
        r = admin.patch("/api/users/limited/limits", json={"rate": 5, "max_tokens_mode": "reject"})
        assert r.status_code == 200, r.text
        assert r.json()["overrides"] == {"rate": 5.0, "max_tokens_mode": "reject"}
        assert r.json()["effective"]["rate"] == 5.0
        got = admin.get("/api/users/limited/limits").json()
        assert got["effective"]["max_tokens_mode"] == "reject"
        assert admin.patch("/api/users/limited/limits", json={"rate": None}).json()["overrides"] == {
            "max_tokens_mode": "reject"}
        for bad in ({}, {"rate": -1}, {"nope": 1}, {"max_tokens_mode": "maybe"}):
            assert admin.patch("/api/users/limited/limits", json=bad).status_code == 400, bad


def test_usage_page_charts_tokens_per_user_and_per_model(
        stack: Stack, admin_url: str, browser: WebDriver, shots: Path) -> None:
    generate(stack, "web-usage-a", tokens=6)
    generate(stack, "web-usage-b", tokens=3)
    sign_in(browser, admin_url, "/usage")
    wait_for(browser, lambda: row(browser, "data-group", "web-usage-a"), "alice's usage row")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    a_row = row(browser, "data-group", "web-usage-a")
    assert a_row.get_attribute("data-period") == today
    cells = [c.text for c in a_row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "web-usage-a" and cells[2] == "1" and cells[8] == "exact"
    assert int(cells[6]) > 0  # tokens out
    chart = browser.find_element(By.ID, "usage-chart")
    assert chart.get_attribute("data-periods") == "14"  # every day of the default range
    # Other tests' users share this gateway: the six biggest get their own colour.
    groups = (chart.get_attribute("data-groups") or "").split("\n")
    legend = browser.find_element(By.ID, "usage-legend").text
    assert groups and all(g in legend for g in groups)

    Select(browser.find_element(By.ID, "usage-by")).select_by_value("model")
    wait_for(browser, lambda: row(browser, "data-group", MODEL), "the per-model row")
    assert browser.find_element(By.ID, "usage-group-heading").text == "Model"
    assert row(browser, "data-group", "web-usage-a") is None
    browser.save_screenshot(str(shots / "usage.png"))


def test_pools_and_a_required_model_pull_on_the_page(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    sim = stack.sims[0]
    sim.app.options.pull_step_s = 0.3  # about 3 s of progress lines: long enough to watch
    sign_in(browser, admin_url)
    r = httpx.post(admin_url + "/api/pools", headers=AUTH, timeout=10, json={
        "name": "gpu", "backends": [sim.url], "aliases": {"fast": MODEL},
        "required_models": ["phi3:mini"]})
    assert r.status_code == 201, r.text
    try:
        pool = wait_for(browser, lambda: row(browser, "data-pool", "gpu"), "the pool row")
        assert "phi3:mini" in pool.find_element(By.CSS_SELECTOR, ".required").text
        assert "fast → llama3.2:latest" in pool.find_element(By.CSS_SELECTOR, ".aliases").text
        bar = wait_for(browser, lambda: browser.find_elements(
            By.CSS_SELECTOR, "#pulls-table tbody tr progress"), "a pull with a progress bar")
        assert "phi3:mini" in browser.find_element(By.ID, "pulls-table").text
        assert bar[0].get_attribute("max") == "100"
        wait_for(browser, lambda: "phi3:mini pulled on" in browser.find_element(
            By.ID, "event-log").text, "the pull's end in the event log", timeout=15)
        wait_for(browser, lambda: browser.find_element(By.ID, "pulls-empty").get_attribute(
            "hidden") is None, "the pull table emptied", timeout=5)
        assert not browser.find_elements(By.CSS_SELECTOR, "#pulls-table tbody tr")
    finally:
        httpx.delete(admin_url + "/api/pools/gpu", headers=AUTH, timeout=10)
        sim.app.options.pull_step_s = None


# -- Hostile names ----------------------------------------------------------------------

XSS_USER = "<img src=x onerror=\"document.title='pwned'\">"
SLASH_USER = "web/slash"

FIND_ROW = """
const [attr, value] = arguments;
return [...document.querySelectorAll('tr')].find((tr) => tr.getAttribute(attr) === value) || null;
"""


def test_hostile_user_ids_are_text_and_a_slash_user_can_be_blocked(
        stack: Stack, admin_url: str, browser: WebDriver) -> None:
    """X-User-ID is the client's own text: shown as it is, never parsed as HTML; an id
    holding '/' was a 404 for the Block button (the admin API routes it now)."""
    generate(stack, XSS_USER)
    generate(stack, SLASH_USER)
    sign_in(browser, admin_url)
    xss_row = wait_for(browser, lambda: browser.execute_script(FIND_ROW, "data-user", XSS_USER),
                       "the hostile user's row")
    assert xss_row.find_element(By.CSS_SELECTOR, ".user").text == XSS_USER
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    assert "pwned" not in browser.title
    slash_row = wait_for(browser, lambda: browser.execute_script(FIND_ROW, "data-user",
                                                                 SLASH_USER), "the slash row")
    slash_row.find_element(By.CSS_SELECTOR, '[data-action="block"]').click()
    wait_for(browser, lambda: SLASH_USER in on_loop(
        stack, stack.state.operator.list_blocked)["users"], "the slash user blocked")
    r = httpx.post(stack.url + "/api/generate", headers={"X-User-ID": SLASH_USER}, timeout=10,
                   json={"model": MODEL, "prompt": "x", "stream": False})
    assert r.status_code == 403
    sign_in(browser, admin_url, "/usage")
    usage_row = wait_for(browser, lambda: browser.execute_script(FIND_ROW, "data-group", XSS_USER),
                         "the hostile user's usage row")
    assert XSS_USER in usage_row.text
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    assert "pwned" not in browser.title
