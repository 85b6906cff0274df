"""The page in a real browser: headless Chromium from the distribution's packages, driven by
Selenium through the distribution's chromium-driver (`.ci/run` installs both with apt).

Asks for a rhymed, tonal 七绝 acrostic and checks the poems shown; the screenshot is kept as a
test artifact (the path is printed). TANGSHI_BROWSER_CHECKPOINT=DIR runs it on another model and
TANGSHI_BROWSER_SCREENSHOT=PATH copies the screenshot there (how tangshi_jax/static/serve.png was made).
"""

import os
import re
import shutil

import pytest

from tangshi_jax import release, rules, sample, serve
from tangshi_jax.batcher import Engine

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

pytestmark = pytest.mark.slow  # a browser and a server


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not DRIVER:
        pytest.skip(
            "no chromium and chromedriver on PATH; install them with "
            "`apt-get install chromium chromium-driver` (.ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=760,900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(titles_run):
    directory = os.environ.get("TANGSHI_BROWSER_CHECKPOINT") or titles_run[0]
    loaded = release.load_model(checkpoint_dir=directory)
    engine = Engine(loaded, max_rows=16, corpus_lines=sample.corpus_lines(loaded.train_config.data), min_rows=4)
    engine.warm_up()
    app = serve.create_app(
        engine,
        release.last_metrics(directory, epoch=loaded.progress.get("epoch")),
        max_poems=2,
        log=lambda message: None,
    )
    with serve.serving(app) as url:
        yield url, loaded.vocab, engine


def test_a_rhymed_tonal_qijue_acrostic_in_the_browser(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    url, vocab, _ = page_url
    heads = (
        "春花秋月"
        if set("春花秋月") <= set(vocab)
        else "".join([char for char in vocab if sample.data.is_hanzi(char)][:4])
    )
    browser.get(url + "/")
    WebDriverWait(browser, 20).until(lambda driver: driver.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "acrostic").send_keys(heads)
    Select(browser.find_element(By.ID, "form")).select_by_value("qijue")
    browser.find_element(By.ID, "rhyme").click()
    browser.find_element(By.ID, "tones").click()
    count = browser.find_element(By.ID, "num")
    count.clear()
    count.send_keys("2")
    browser.find_element(By.ID, "write").click()
    WebDriverWait(browser, 60).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), " s "))
    poems = browser.find_elements(By.CSS_SELECTOR, "#poems .poem")
    assert len(poems) == 2
    for poem in poems:
        shown = [line.text for line in poem.find_elements(By.TAG_NAME, "p")]
        verses = [verse for verse in re.split("[，。]", "".join(shown)) if verse]
        assert len(shown) == 2 and [len(verse) for verse in verses] == [7] * 4, shown
        assert [verse[0] for verse in verses] == list(heads)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
    if os.environ.get("TANGSHI_BROWSER_SCREENSHOT"):
        shutil.copy(shot, os.environ["TANGSHI_BROWSER_SCREENSHOT"])


def test_the_browser_shows_a_refusal_inline_then_answers_a_couplet(browser, page_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, vocab, _ = page_url
    browser.get(url + "/")
    browser.find_element(By.ID, "rhyme").click()  # rhyme without a form
    browser.find_element(By.ID, "write").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda driver: error.get_attribute("hidden") is None)
    assert "need a form" in error.text and "\n" not in error.text
    assert browser.find_elements(By.CSS_SELECTOR, "#poems .poem") == []
    browser.find_element(By.ID, "rhyme").click()
    prosody = rules.build_prosody(tuple(vocab))
    hanzi = [char for index, char in enumerate(vocab) if prosody.hanzi[index]]
    oblique = next(char for index, char in enumerate(vocab) if prosody.oblique[index] and not prosody.level[index])
    first = "".join([char for char in hanzi if char != oblique][:3]) + oblique  # a 上联 ends oblique
    browser.find_element(By.ID, "couplet").send_keys(first)
    browser.find_element(By.ID, "write").click()
    WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#poems .poem") or error.text)
    assert error.get_attribute("hidden") is not None, error.text
    assert error.get_attribute("hidden") is not None
    for poem in browser.find_elements(By.CSS_SELECTOR, "#poems .poem"):
        lines = [line.text for line in poem.find_elements(By.TAG_NAME, "p")]
        assert lines == [first + "，", lines[1]] and len(lines[1]) == 5 and lines[1].endswith("。")


def test_the_page_says_it_is_warming_up_until_the_server_is_ready(browser, page_url):
    """A server whose model is still loading: the page says so and keeps its button off, then,
    once the model is ready, describes it and lets the reader write."""
    import threading

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = page_url[2]  # the warm engine of the other tests, served by a second app
    loaded = threading.Event()
    app = serve.create_app(None, starting=lambda: (loaded.wait(60), (engine, None))[1], log=lambda line: None)
    with serve.serving(app) as url:
        browser.get(url + "/")
        model = browser.find_element(By.ID, "model")
        WebDriverWait(browser, 30).until(lambda driver: "warming up" in model.text)
        assert not browser.find_element(By.ID, "write").is_enabled()
        loaded.set()
        WebDriverWait(browser, 30).until(lambda driver: "characters, step" in model.text)
        assert browser.find_element(By.ID, "write").is_enabled()
