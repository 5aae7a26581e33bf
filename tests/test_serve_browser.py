"""The web page in headless Chromium (selenium + Debian's chromium-driver): upload an image, get a streamed
answer equal to the API's, a zero-shot bar chart equal to /v1/classify, and generated images equal to
/v1/images/generations'."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_helpers import data_uri, png_bytes, running  # noqa: E402

from mmlm.serve import ServeConfig, create_app  # noqa: E402
from mmlm.serve.tiny import tiny_clip, tiny_llava, tiny_text_to_image  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,  # a headless Chromium per module
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs Debian's chromium and chromium-driver (make setup installs them)")]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download: a given path
    yield driver
    driver.quit()


def wait(driver, css: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def upload(driver, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait(driver, "#preview[src^='data:image/png;base64,']")
    return data_uri(image.read_bytes())


def test_page_uploads_an_image_and_streams_an_answer(browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    app = create_app(tiny_llava(tmp_path / "tiny-llava"))
    with running(app) as url:
        browser.get(url + "/")
        wait(browser, "#chat:not(.hidden)")
        uri = upload(browser, tmp_path)
        browser.find_element(By.ID, "prompt").send_keys("what shape is this?")
        browser.find_element(By.ID, "send").click()
        answer = wait(browser, ".assistant[data-done='1']")
        expected = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "max_tokens": 128, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "what shape is this?"}]}]}
        ).json()["choices"][0]["message"]["content"]
        assert "error" not in answer.get_attribute("class")
        assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces
        assert answer.get_attribute("textContent") == expected


def test_page_sends_a_video_and_a_sound_to_a_llava_that_reads_them(browser, tmp_path):
    import base64

    import httpx
    import numpy as np
    from selenium.webdriver.common.by import By

    from mmlm.data.media import write_audio, write_video

    frames = np.full((6, 32, 32, 3), 20, np.uint8)
    for t in range(6):
        frames[t, 10:20, 3 * t:3 * t + 10] = (230, 60, 30)
    clip, sound = write_video(tmp_path / "clip.mp4", frames), tmp_path / "tone.wav"
    write_audio(sound, (0.4 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32))
    with running(create_app(tiny_llava(tmp_path / "tiny-llava", media=True))) as url:
        browser.get(url + "/")
        wait(browser, "#chat:not(.hidden)")
        assert "video/*" in browser.find_element(By.ID, "file").get_attribute("accept")
        browser.find_element(By.ID, "file").send_keys(str(clip))
        wait(browser, "#video-preview[src^='data:video/mp4;base64,']")
        browser.find_element(By.ID, "file").send_keys(str(sound))
        wait(browser, "#audio-preview[src^='data:audio/']")
        browser.find_element(By.ID, "prompt").send_keys("what moves?")
        browser.find_element(By.ID, "send").click()
        answer = wait(browser, ".assistant[data-done='1']")
        expected = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "max_tokens": 128, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": data_uri(clip.read_bytes(), "video/mp4")}},
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(sound.read_bytes()).decode(),
                                                        "format": "wav"}},
                {"type": "text", "text": "what moves?"}]}]}).json()["choices"][0]["message"]["content"]
        assert "error" not in answer.get_attribute("class"), answer.get_attribute("textContent")
        assert answer.get_attribute("textContent") == expected


def test_page_draws_a_zero_shot_chart(browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    app = create_app(tiny_clip(tmp_path / "tiny-clip"))
    with running(app) as url:
        browser.get(url + "/")
        wait(browser, "#zeroshot:not(.hidden)")
        uri = upload(browser, tmp_path)
        labels = browser.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys("circle, star, cross")
        browser.find_element(By.ID, "classify").click()
        wait(browser, "#chart .bar-row:nth-child(3)")
        rows = browser.find_elements(By.CSS_SELECTOR, "#chart .bar-row")
        drawn = {r.find_element(By.TAG_NAME, "span").text: float(r.find_element(By.CLASS_NAME, "bar").get_attribute(
            "data-probability")) for r in rows}
        api = httpx.post(url + "/v1/classify", json={"image": uri, "labels": ["circle", "star", "cross"]}).json()
    assert drawn == pytest.approx({d["label"]: d["probability"] for d in api["data"]}, abs=1e-6)
    widths = [float(r.find_element(By.CLASS_NAME, "bar").get_attribute("style").split("width:")[1].split("%")[0])
              for r in rows]
    assert widths == sorted(widths, reverse=True) and abs(sum(widths) - 100) < 0.5  # bars sized by probability


def open_fresh(browser, url: str) -> None:
    """The page as a new tab sees it: no API key kept from an earlier test."""
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url + "/")


def test_page_asks_for_the_api_key_and_sends_it(browser, tmp_path):
    from selenium.webdriver.common.by import By

    app = create_app(tiny_llava(tmp_path / "tiny-llava"), ServeConfig(api_key="sesame"))
    with running(app) as url:
        open_fresh(browser, url)
        wait(browser, "#auth:not(.hidden)")  # the server needs a key: the page asks for it
        assert browser.title == "mmlm: tiny-llava"
        browser.find_element(By.ID, "prompt").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        refused = wait(browser, ".assistant[data-done='1']")
        assert "error" in refused.get_attribute("class") and "API key" in refused.text
        browser.find_element(By.ID, "api-key").send_keys("sesame")
        browser.find_element(By.ID, "use-key").click()
        browser.find_element(By.ID, "prompt").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        answer = wait(browser, ".assistant[data-done='1']:not(.error)")
        assert answer.get_attribute("textContent")  # answered with the key
        browser.get(url + "/")  # the key stays for this tab
        assert wait(browser, "#chat:not(.hidden)") and browser.find_element(By.ID, "api-key").get_attribute(
            "value") == "sesame"


def test_page_generates_images_with_the_api_key(browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    app = create_app(tiny_text_to_image(tmp_path / "tiny-t2i"), ServeConfig(api_key="sesame"))
    with running(app) as url:
        open_fresh(browser, url)
        wait(browser, "#images:not(.hidden)")
        assert not browser.find_element(By.ID, "image-input").is_displayed()  # nothing to upload
        browser.find_element(By.ID, "api-key").send_keys("sesame")
        browser.find_element(By.ID, "use-key").click()
        for field, value in [("image-n", "2"), ("image-steps", "2"), ("image-seed", "5")]:
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "image-prompt").send_keys("a red circle")
        browser.find_element(By.ID, "generate").click()
        wait(browser, "#gallery[data-done='1']")
        assert browser.find_element(By.ID, "gen-error").text == ""
        shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
        api = httpx.post(url + "/v1/images/generations", headers={"Authorization": "Bearer sesame"}, timeout=60,
                         json={"prompt": "a red circle", "n": 2, "steps": 2, "seed": 5, "guidance_scale": 7.5}).json()
    assert shown == ["data:image/png;base64," + d["b64_json"] for d in api["data"]]
