"""The web page in a real browser (headless Debian Chromium through Playwright): upload -> overlay shown
-> class toggled -> mask downloaded, the mask equal to ``fcnseg predict``'s; and a phone-sized layout."""
from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.inference.segmenter import Segmenter
from fcnseg.serve import ServeSettings, create_app
from tiny_models import random_image, tiny_checkpoint
from live_server import running_server

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny checkpoints, a photo, and what ``fcnseg predict`` makes of it."""
    tmp = tmp_path_factory.mktemp("page")
    five = tiny_checkpoint(tmp / "five.safetensors")
    three = tiny_checkpoint(tmp / "three.safetensors", num_classes=3)
    photo = tmp / "street.jpg"
    random_image(72, 96, 5).save(photo, quality=92)
    assert main(["predict", "--checkpoint", str(five), str(photo), "--out", str(tmp / "pred"), "--quiet"]) == 0
    return five, three, photo, tmp / "pred" / "street.png"


@pytest.fixture
def site(assets):
    """A server (for this test only) with both models; its URL, the photo and the predicted mask file."""
    five, three, photo, predicted = assets
    app = create_app({"five": Segmenter.from_checkpoint(str(five), batch_size=8),
                      "three": Segmenter.from_checkpoint(str(three), batch_size=8)})
    with running_server(app) as (_server, url, _thread):
        yield url, photo, predicted


VISIBLE_PIXELS = "() => { const c = document.getElementById('mask'); " \
                 "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; " \
                 "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] === 255; return n; }"


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_upload_overlay_toggle_hover_and_download_equal_fcnseg_predict(site, browser, tmp_path):
    url, photo, predicted = site
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready=models]")
    assert page.locator("#model option").all_inner_texts() == ["five (5 classes)", "three (3 classes)"]

    page.set_input_files("#file", str(photo))
    page.wait_for_selector("body[data-ready=result]")
    assert page.is_visible("#viewer") and not page.is_visible("#drop") and not page.is_visible("#keyform")
    expected = np.asarray(Image.open(predicted))
    assert page.evaluate("() => [document.getElementById('mask').width, document.getElementById('mask').height]") \
        == [96, 72]
    assert page.evaluate(VISIBLE_PIXELS) == expected.size  # the overlay covers the photo

    # the legend lists classes by share; hiding the first clears exactly its pixels from the overlay
    first = page.locator("#legend button").first
    cls = int(first.get_attribute("data-class-id"))
    share = first.locator(".share").inner_text()
    assert share == f"{100 * (expected == cls).mean():.1f}%"
    first.hover()  # pointing at a class highlights it: the others are dimmed
    assert page.evaluate(VISIBLE_PIXELS) == int((expected == cls).sum())
    first.click()
    assert first.get_attribute("aria-pressed") == "false"
    page.mouse.move(0, 0)  # leave the legend: no highlight dimming
    assert page.evaluate(VISIBLE_PIXELS) == expected.size - int((expected == cls).sum())
    first.click()
    page.mouse.move(0, 0)
    assert first.get_attribute("aria-pressed") == "true" and page.evaluate(VISIBLE_PIXELS) == expected.size

    page.fill("#opacity", "30")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#mask", "c => c.style.opacity") == "0.3"
    assert page.inner_text("#opacityval") == "30%"

    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.75)
    x, y = int(96 * 0.25), int(72 * 0.75)
    assert page.inner_text("#hover").startswith(f"thing{expected[y, x]}")

    with page.expect_download() as info:
        page.click("#dlmask")
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    assert saved.name == "street_mask.png"
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), expected)
    assert saved.read_bytes() == predicted.read_bytes()

    with page.expect_download() as info:
        page.click("#dloverlay")
    info.value.save_as(tmp_path / "overlay.png")
    assert Image.open(tmp_path / "overlay.png").size == (96, 72)

    page.select_option("#model", "three")  # another model re-segments the same photo
    page.wait_for_selector("body[data-ready=result]")
    page.wait_for_function("() => document.querySelectorAll('#legend button').length === 3")
    assert errors == []
    page.close()


DROP_FILE = """([name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
    const zone = document.getElementById("drop");
    zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
}"""


def test_phone_layout_stacks_without_sideways_scrolling_and_errors_are_shown(site, browser, tmp_path):
    url, photo, predicted = site
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url)
    page.wait_for_selector("body[data-ready=models]")
    page.evaluate(DROP_FILE, [photo.name, base64.b64encode(photo.read_bytes()).decode()])  # drag and drop
    page.wait_for_selector("body[data-ready=result]")
    assert page.evaluate(VISIBLE_PIXELS) == np.asarray(Image.open(predicted)).size
    stage, panel = page.locator(".stage").bounding_box(), page.locator(".panel").bounding_box()
    assert panel["y"] >= stage["y"] + stage["height"]  # the legend goes below the picture
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    assert page.locator("#mask").bounding_box()["width"] <= 390 and not page.is_visible("#keyform")

    ppm = tmp_path / "frame.ppm"  # the server reads PPM, Chromium cannot show it: the mask alone
    Image.open(photo).save(ppm)
    page.set_input_files("#file2", str(ppm))
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('frame.ppm')")
    assert "the mask is shown alone" in page.inner_text("#status")
    assert page.evaluate(VISIBLE_PIXELS) == np.asarray(Image.open(predicted)).size

    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"this is text")
    page.set_input_files("#file2", str(not_image))
    page.wait_for_selector("body[data-ready=error]")
    assert "not an image format" in page.inner_text("#status")
    assert "error" in (page.get_attribute("#status", "class") or "")
    page.close()


def test_the_page_asks_for_the_api_key_and_then_works(assets, browser):
    five, _, photo, _ = assets
    app = create_app({"five": Segmenter.from_checkpoint(str(five))}, ServeSettings(api_key="k3y"))
    with running_server(app) as (_server, url, _thread):
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#keyform:not([hidden])")
        assert "needs an API key" in page.inner_text("#status")
        page.fill("#apikey", "k3y")
        page.click("#keyform button")
        page.wait_for_selector("body[data-ready=models]")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-ready=result]")
        assert not page.is_visible("#keyform") and page.locator("#legend button").count() == 5
        page.close()
