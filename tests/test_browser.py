"""The search page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by selenium, against `ragbeam serve` on 127.0.0.1."""
from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import CORPUS, ragbeam
from tests.test_serve import TOKEN, Server

# the README's picture: RAGBEAM_SCREENSHOT=docs/serve-search.png redraws it
SCREENSHOT_ENV = 'RAGBEAM_SCREENSHOT'
XSS = ('A canary paragraph about quince marmalade. '
       '<script>document.title = "pwned"; window.pwned = 1;</script> '
       '<img src="x" onerror="document.title = \'pwned\'; window.pwned = 1"> '
       'It ends here.\n')


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which('chromium'), shutil.which('chromedriver')
    if not (binary and driver):
        pytest.fail('needs chromium and chromium-driver (./run_local.sh test installs them)')
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # no network beyond 127.0.0.1 here: Chromium's background connections (updates, sync,
    # QUIC) are turned off rather than refused at every start
    for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage',
                 '--window-size=1200,900', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(service=Service(driver), options=options)
    except WebDriverException as e:
        pytest.fail(f'chromium did not start: {e.msg}')
    yield chrome
    chrome.quit()


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp('browser')
    src, out = root / 'src', root / 'out'
    src.mkdir()
    shutil.copy2(CORPUS / 'text' / 'rfc3986.txt', src / 'rfc3986.txt')
    (src / 'payload.html.txt').write_text(XSS)
    ragbeam('run', '--input', src, '--output', out)
    (root / 'token').write_text(TOKEN)
    server = Server('--output', out, '--uploads', root / 'uploads', '--token-file',
                    root / 'token', '--embedder', 'hash')
    yield server, root
    server.stop()


def _search(browser, server, text: str, mode: str = 'hybrid'):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + '/')
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, 'status').get_attribute('data-version') is not None)
    box = browser.find_element(By.ID, 'q')
    box.clear()
    box.send_keys(text)
    Select(browser.find_element(By.ID, 'mode')).select_by_value(mode)
    browser.find_element(By.CSS_SELECTOR, '#search button').click()
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, '#results li')
        or b.find_element(By.ID, 'message').text)
    return browser.find_elements(By.CSS_SELECTOR, '#results li')


def test_a_query_typed_in_the_page_shows_results_with_their_sources(browser, page, tmp_path):
    import os

    from selenium.webdriver.common.by import By

    server, _ = page
    results = _search(browser, server, 'percent encoding of reserved characters')
    assert len(results) == 10
    first = results[0]
    assert 'rfc3986.txt [' in first.find_element(By.CLASS_NAME, 'source').text
    assert first.find_elements(By.TAG_NAME, 'mark')  # the query's words, highlighted
    assert 'dense #' in first.find_element(By.CLASS_NAME, 'ranks').text
    assert 'version 0' in browser.find_element(By.ID, 'status').text
    screenshot = os.environ.get(SCREENSHOT_ENV) or str(tmp_path / 'results.png')
    assert browser.save_screenshot(screenshot)


def test_a_document_holding_markup_shows_as_text_and_runs_nothing(browser, page):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    server, _ = page
    results = _search(browser, server, 'canary quince marmalade', mode='lexical')
    text = results[0].find_element(By.CLASS_NAME, 'text').text
    assert '<script>document.title = "pwned"' in text and 'onerror=' in text
    assert browser.title == 'ragbeam search'
    assert browser.execute_script('return window.pwned === undefined')
    assert not browser.find_elements(By.CSS_SELECTOR, '#results img, #results script')
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text


def test_a_file_uploaded_through_the_form_becomes_searchable(browser, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, root = page
    upload = root / 'heron-census.txt'
    upload.write_text('The heron census of the northern marsh counted ninety-one birds.\n')
    browser.get(server.url + '/')
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, 'upload-panel').is_displayed())
    browser.find_element(By.ID, 'file').send_keys(str(upload))
    browser.find_element(By.ID, 'token').send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, '#upload button').click()
    WebDriverWait(browser, 300, poll_frequency=1).until(
        lambda b: b.find_element(By.CSS_SELECTOR, '#runs li').get_attribute('data-state')
        in ('committed', 'failed', 'refused'))
    line = browser.find_element(By.CSS_SELECTOR, '#runs li')
    assert line.get_attribute('data-state') == 'committed', line.text
    time.sleep(0.5)  # the status panel reloads after the run
    results = _search(browser, server, 'heron census northern marsh', mode='lexical')
    assert results[0].find_element(By.CLASS_NAME, 'source').text.startswith(
        str(root / 'uploads' / 'heron-census.txt'))
    assert 'version 1' in browser.find_element(By.ID, 'status').text
