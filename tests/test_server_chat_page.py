"""The chat page at `/` in headless Chromium: it sends a message and shows the answer streamed from the server.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them); without them this test fails rather than skips.
"""

import shutil
import tempfile

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from _server_helpers import make_checkpoint, server_process

KEY = "page-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    with server_process(model_dir, "--api-key", KEY, "--served-model-name", "page-model") as base:
        yield base


@pytest.fixture
def browser():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "chromium and chromium-driver must be installed (apt-get install chromium " \
                              "chromium-driver)"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_an_answer(server, browser):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    # Without the key the header tells a person what to do (and where), not an HTTP instruction.
    wait.until(lambda b: "enter it in the API key box" in b.find_element(By.ID, "model").text)
    assert "Authorization" not in browser.find_element(By.ID, "model").text
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong")
    key.send_keys(Keys.TAB)
    wait.until(lambda b: "wrong API key" in b.find_element(By.ID, "model").text)
    key.clear()
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)   # 'change': the page stores the key and lists the model with it
    wait.until(lambda b: "page-model" in b.find_element(By.ID, "model").text)
    for field, value in (("max-tokens", "12"), ("temperature", "0")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there")
    box.send_keys(Keys.ENTER)

    answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state='done']"))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").get_property("textContent") == "Hello there"
    shown = answer.get_property("textContent")
    # The same request through the API (greedy, alone on the server) gives the text the page must show.
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    ref = client.chat.completions.create(model="page-model", messages=[{"role": "user", "content": "Hello there"}],
                                         max_tokens=12, temperature=0)
    assert shown == ref.choices[0].message.content and shown
    assert int(answer.get_attribute("data-chunks")) > 1   # it arrived in pieces, not at once
    usage = browser.find_element(By.CSS_SELECTOR, ".meta").text
    assert usage == f"{ref.usage.completion_tokens} tokens"
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
