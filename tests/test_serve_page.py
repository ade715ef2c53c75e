"""The chat page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): type a message,
see the answer stream in, keep the conversation. Skipped, with the reason, only where Chromium is not installed.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from nomoat.config import ModelConfig
from nomoat.model import Transformer
from nomoat.serve.app import ServeConfig, build_app, running
from nomoat.tokenizer import Tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="needs Chromium: apt-get install chromium chromium-driver"
)


class PacedModel(Transformer):
    """10 ms a step, so that tokens reach the page one by one rather than in one network read."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        time.sleep(0.01)
        return super().forward(*args, **kwargs)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


# Counts changes to the newest answer's text as the page writes it.
WATCH_ANSWER = """
window.answerUpdates = 0;
new MutationObserver((records) => {
  window.answerUpdates += records.filter((r) => r.target.classList && r.target.classList.contains("assistant")).length;
}).observe(document.getElementById("log"), {childList: true, subtree: true});
"""


@pytest.mark.slow  # starting Chromium takes a few seconds
def test_chat_page_streams_answers_and_keeps_the_conversation(browser, shakespeare_shards):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    model = PacedModel(ModelConfig(vocab_size=320, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=256))
    app = build_app(model.eval(), Tokenizer.load(shakespeare_shards[1]), "tiny")
    engine = app.app.state.engine
    with running(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 10).until(lambda b: "tiny" in b.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max-tokens", "20")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        for turn, text in enumerate(["Hello there", "And again"], start=1):
            before = engine.metrics.tokens
            browser.execute_script(WATCH_ANSWER)
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 20).until(
                lambda b, n=turn: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == n
            )
            users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
            answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
            assert users == ["Hello there", "And again"][:turn] and len(answers) == turn
            assert answers[-1] and engine.metrics.tokens > before  # streamed from the engine, not made up
            assert not browser.find_elements(By.CSS_SELECTOR, ".error")
            assert browser.execute_script("return window.answerUpdates") > 2  # the answer grew piece by piece
        # The page keeps the conversation, and sends all of it with the next message.
        history = browser.execute_script("return messages.map(m => m.role)")
        assert history == ["user", "assistant", "user", "assistant"]


@pytest.mark.slow  # Chromium
def test_chat_page_sends_the_api_key(browser, shakespeare_shards):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=128))
    app = build_app(model.eval(), Tokenizer.load(shakespeare_shards[1]), "tiny", ServeConfig(api_key="sesame"))
    with running(app) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "input").send_keys("Hi")
        browser.find_element(By.ID, "send").click()
        error = WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))
        assert "API key" in error[0].text
        browser.find_element(By.ID, "api-key").send_keys("sesame")
        browser.find_element(By.ID, "input").send_keys("Hi again")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        assert browser.execute_script("return messages.length") == 2  # the failed turn was not kept
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "128"  # capped at the context
