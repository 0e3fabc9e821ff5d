"""The admin page in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
log in with the token, see the stores, sync one, watch the job finish, find an identity."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import PEOPLE, wait_until

ADMIN_TOKEN = "admin-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_admin_page_login_sync_and_search(make_server, browser):
    srv = make_server()
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    # The page redraws its tables every few seconds: look elements up afresh on every try.
    wait = WebDriverWait(browser, 60, ignored_exceptions=[NoSuchElementException, StaleElementReferenceException])

    def text_of(css: str) -> str:
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css).text)

    def click(css: str) -> None:
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)

    browser.get(srv.url + "/_mxisd/admin/")
    # A wrong token is refused and the console stays hidden.
    browser.find_element(By.ID, "token").send_keys("wrong-token-0123456789abcdef")
    click("#login-form button")
    wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "refused"))
    assert not browser.find_element(By.ID, "console").is_displayed()

    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    click("#login-form button")
    people = '#stores tr[data-store="people"]'
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, people)))
    assert text_of(people + " .identities") == "3"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, people), "ok"))
    assert "file" in text_of(people)
    wait.until(ec.text_to_be_present_in_element((By.ID, "indexers"), "running (pid"))
    # The token is not in the address or the page, only in this tab's session storage.
    assert ADMIN_TOKEN not in browser.current_url and ADMIN_TOKEN not in browser.page_source

    srv.write_people(PEOPLE + [{"localpart": "dave", "display_name": "Dave Lister", "emails": ["dave@example.com"]}])
    click(people + ' button[data-full="false"]')
    job_id = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#jobs tr[data-job]").get_attribute("data-job"))
    done = f'#jobs tr[data-job="{job_id}"][data-state="done"]'
    assert text_of(done + " .outcome") == "ok"
    assert wait.until(lambda d: d.find_element(By.CSS_SELECTOR, done + " progress").get_attribute("value")) == "100"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, people + " .identities"), "4"))

    browser.find_element(By.ID, "q").send_keys("Dave@Example.com")
    click("#search-form button")
    wait.until(ec.text_to_be_present_in_element((By.ID, "search-result"), "lookups answer @dave:example.org"))
    assert "Dave Lister" in browser.find_element(By.ID, "search-result").text

    # Reloading the tab keeps the session; forgetting the token logs out.
    browser.refresh()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, people)))
    click("#logout")
    assert browser.find_element(By.ID, "login").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('mxisd-admin-token')") is None
