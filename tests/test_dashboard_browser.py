"""The live dashboard in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through selenium) against a real broker and real workers.

Without the two binaries the tests are skipped, saying so; with
``REQUIRE_SERVICES=1`` (CI) they fail instead. ``DASHBOARD_SCREENSHOT=path.png``
saves the page at the end of the first test, after 45 s of traffic (docs/operations.md's
picture comes from here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.procs import Broker, wait_for
from workers.requester import SyncRequester

pytestmark = [pytest.mark.heavy, pytest.mark.integration, pytest.mark.timeout(120)]

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if missing:
        why = f"no {' or '.join(missing)} (apt install chromium chromium-driver)"
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(f"BROWSER REQUIRED (REQUIRE_SERVICES=1) but {why}", pytrace=False)
        pytest.skip(f"NO BROWSER: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1050", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: Any, table: str) -> list[list[str]]:
    """The text of each cell of a dashboard table, row by row."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))", f"#{table}")


def names(driver: Any) -> set[str]:
    return {row[1] for row in rows(driver, "workers")}


def until(driver: Any, predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> float:
    """Seconds until ``predicate`` held (polled in the page's own time)."""
    start = time.monotonic()
    wait_for(predicate, timeout, f"{what}; the page shows {rows(driver, 'workers')}")
    return time.monotonic() - start


def click(driver: Any, table: str, key_text: str, action: str, times: int = 1) -> None:
    for _ in range(times):
        driver.execute_script(
            "const row = [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
            ".find(r => r.textContent.includes(arguments[1]));"
            "row.querySelector(`button[data-action='${arguments[2]}']`).click();",
            f"#{table}", key_text, action)


def button_text(driver: Any, table: str, key_text: str, action: str) -> str:
    return driver.execute_script(
        "const row = [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
        ".find(r => r.textContent.includes(arguments[1]));"
        "return row.querySelector(`button[data-action='${arguments[2]}']`).textContent;",
        f"#{table}", key_text, action)


def latency_chart(driver: Any) -> dict[str, Any]:
    """The latency chart's axis labels and, per line, how many pieces it is drawn in."""
    return driver.execute_script(
        "const svg = document.getElementById('chart-latency');"
        "return {labels: [...svg.querySelectorAll('text')].map(t => t.textContent),"
        " pieces: [...svg.querySelectorAll('path')].map("
        "   p => (p.getAttribute('d').match(/M/g) || []).length)};")


def traffic(broker: Broker, seconds: float) -> None:
    """A few callers with varied work for ``seconds``, a failure now and then; then a
    few slow requests left running."""
    stop = time.monotonic() + seconds

    def caller(lane: int) -> None:
        with SyncRequester(broker.requester_url) as requester:
            i = 0
            while time.monotonic() < stop:
                i += 1
                if i % 40 == 0:
                    requester.request("explode", {})
                else:
                    requester.request("sleep_ms", {"ms": 2 + (i * 7 + lane * 13) % 40})

    lanes = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(6)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join(seconds + 10)

    def slow() -> None:
        with SyncRequester(broker.requester_url) as requester:
            requester.request("long_job", {"seconds": 8})  # it reports its progress

    for _ in range(3):
        threading.Thread(target=slow, daemon=True).start()
    time.sleep(2.5)  # shown by the next snapshot

def test_the_fleet_lives_on_the_page(broker: Broker, spawn_worker, browser) -> None:
    for name in ("gpu-1", "gpu-2", "cpu-1"):
        spawn_worker(name, *HANDLERS, "--label", f"pool={name.split('-')[0]}")
    with SyncRequester(broker.requester_url) as requester:  # something for the charts
        for i in range(30):
            requester.request("sleep_ms", {"ms": 5 + i % 10})
        requester.request("explode", {})
        requester.request("nobody_offers_this", {})
    browser.get(broker.http_url + "/dashboard/")
    until(browser, lambda: names(browser) == {"gpu-1", "gpu-2", "cpu-1"}, "3 workers shown")
    assert "pool=gpu" in " ".join(r[2] for r in rows(browser, "workers"))
    commands = {r[0]: r for r in rows(browser, "commands")}
    assert commands["sleep_ms"][2] == "30" and commands["explode"][3:5] == ["1", "0"]
    assert commands["(other)"][3:5] == ["0", "1"]  # not served: no worker offers it
    [failure] = [r for r in rows(browser, "failures") if r[2] == "explode"]
    assert failure[0].endswith(" ago") and failure[1] == "1"
    until(browser, lambda: browser.execute_script(
        "return document.querySelectorAll('#chart-rate path').length") >= 1, "a chart drawn")

    fourth = spawn_worker("edge-1", *HANDLERS, wait=False)
    appeared = until(browser, lambda: "edge-1" in names(browser), "a 4th worker shown")
    fourth.stop(signal.SIGKILL)
    left = until(browser, lambda: "edge-1" not in names(browser), "the killed worker gone")
    print(f"appeared within {appeared:.2f} s of starting, gone {left:.2f} s after kill -9")
    assert browser.find_element("id", "status").text == "live"  # never reloaded
    assert len(rows(browser, "failures")) == 2  # one row per kind, however many pushes

    with SyncRequester(broker.requester_url) as requester:  # a burst of one failure
        for _ in range(12):
            requester.request("explode", {})
        requester.request("slow", {"seconds": 3})  # a long job beside milliseconds
    until(browser, lambda: [r[1] for r in rows(browser, "failures") if r[2] == "explode"]
          == ["13"], "the burst counted in one row")
    until(browser, lambda: latency_chart(browser)["labels"][-1] == "10 s", "the 3 s job drawn")
    chart = latency_chart(browser)  # log scale, a grid line a decade: ms up to the long job
    assert chart["labels"][0] in ("0.1 ms", "1 ms") and len(chart["labels"]) >= 5, chart
    assert min(chart["pieces"]) >= 2, chart  # the quiet seconds between are gaps

    click(browser, "workers", "gpu-2", "drain")  # asks first: nothing happens yet
    assert button_text(browser, "workers", "gpu-2", "drain") == "Drain: sure?"
    time.sleep(1.5)  # a push redraws the row: still asking
    assert button_text(browser, "workers", "gpu-2", "drain") == "Drain: sure?"
    assert not next(w for w in broker.workers() if w["name"] == "gpu-2")["draining"]
    click(browser, "workers", "gpu-2", "drain")
    until(browser, lambda: next(w for w in broker.workers() if w["name"] == "gpu-2")
          ["draining"], "gpu-2 drained in the registry")
    until(browser, lambda: any(r[1] == "gpu-2" and r[3] == "draining"
                               for r in rows(browser, "workers")), "gpu-2 shown draining")
    click(browser, "workers", "gpu-2", "undrain")
    until(browser, lambda: not next(w for w in broker.workers() if w["name"] == "gpu-2")
          ["draining"], "gpu-2 back in rotation")
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        traffic(broker, seconds=45)  # something worth a picture on the charts
        browser.save_screenshot(os.environ["DASHBOARD_SCREENSHOT"])


def test_a_running_request_is_cancelled_from_the_page(broker: Broker, spawn_worker,
                                                      browser) -> None:
    spawn_worker("slowpoke", *HANDLERS)
    answer: dict[str, Any] = {}

    def call() -> None:
        with SyncRequester(broker.requester_url) as requester:
            answer["response"] = requester.request("long_job", {"seconds": 60}, timeout=90)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    browser.get(broker.http_url + "/dashboard/")
    until(browser, lambda: any(r[1] == "long_job" for r in rows(browser, "running")),
          "the running request shown")
    time.sleep(2.5)  # more snapshots: its row is refilled, not repeated
    [row] = rows(browser, "running")
    assert re.fullmatch(r"\d+(\.\d)?% \d+\.\ds of 60s", row[3]), row  # its progress
    click(browser, "running", "long_job", "cancel")
    time.sleep(1.5)
    assert caller.is_alive()  # the first click only asks
    click(browser, "running", "long_job", "cancel")
    caller.join(15)
    assert answer["response"].code == "cancelled"
    assert answer["response"].error.endswith(
        "cancelled by a loopback peer (protected mode) on the dashboard")  # who, and where
    until(browser, lambda: not rows(browser, "running"), "the request gone from the page")


def test_with_credentials_the_page_asks_for_a_key_or_a_staff_login(
        broker_factory, browser, tmp_path: Path) -> None:
    broker = broker_factory()
    key = broker.manage("token", "create", "admin", "ops").stdout.strip()
    made = broker.manage("createsuperuser", "--noinput", "--username", "root",
                         "--email", "root@example.com",
                         env={"DJANGO_SUPERUSER_PASSWORD": "a-long-test-password"})
    assert made.returncode == 0, made.stderr
    wait_for(lambda: not _protected(broker), 15, "protected mode to end")

    browser.get(broker.http_url + "/dashboard/")
    until(browser, lambda: browser.find_element("id", "auth").is_displayed(), "the key form")
    assert not browser.find_element("id", "board").is_displayed()
    assert browser.find_element("id", "status").text == "locked"  # not a green "live"
    browser.find_element("id", "auth-key").send_keys("not-the-key")
    browser.find_element("css selector", "#auth-form button").click()
    until(browser, lambda: browser.find_element("id", "auth-error").text, "the refusal shown")
    assert browser.find_element("id", "auth-error").text == \
        "Invalid key: not an admin key of this broker"
    assert not browser.find_element("id", "board").is_displayed()

    browser.refresh()
    until(browser, lambda: browser.find_element("id", "auth").is_displayed(), "the key form")
    with flood_of_logins(broker):  # 400 sockets waiting to log in, from 100 addresses
        time.sleep(3)  # the operator types the key: the page holds no socket meanwhile,
        assert browser.find_element("id", "auth-error").text == ""  # so none was pushed out
        browser.find_element("id", "auth-key").send_keys(key)
        browser.find_element("css selector", "#auth-form button").click()
        until(browser, lambda: browser.find_element("id", "board").is_displayed(), "the board")

    browser.delete_all_cookies()
    browser.execute_script("sessionStorage.clear()")
    browser.get(broker.http_url + "/admin/login/?next=/dashboard/")
    browser.find_element("name", "username").send_keys("root")
    browser.find_element("name", "password").send_keys("a-long-test-password")
    browser.find_element("css selector", "input[type=submit]").click()
    until(browser, lambda: browser.find_element("id", "board").is_displayed(),
          "the board for a staff login")


@contextlib.contextmanager
def flood_of_logins(broker: Broker) -> Iterator[None]:
    """Dashboard sockets that never send a key, 4 from each of 100 addresses, opened
    again as fast as the broker closes them (issue 24: they pushed out an operator who
    took 3 s to type the key, with 4429)."""
    from tests.rawws import RawClient

    stop = threading.Event()

    def hold(source: str) -> None:
        while not stop.is_set():
            try:
                with contextlib.ExitStack() as sockets:
                    for _ in range(4):
                        client = RawClient(broker.host, broker.http_port, "/ws/dashboard/",
                                           source=source, timeout=2)
                        sockets.callback(client.sock.close)
                    stop.wait(0.5)
            except OSError:
                stop.wait(0.1)

    threads = [threading.Thread(target=hold, args=(f"127.0.1.{i}",), daemon=True)
               for i in range(1, 101)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)


def _protected(broker: Broker) -> bool:
    try:
        broker.workers()
        return True
    except OSError:  # 403 once credentials exist
        return False


def test_the_admin_lists_fit_a_1400_px_screen_one_line_a_row(broker: Broker, spawn_worker,
                                                             browser) -> None:
    for name in ("gpu-box-with-a-long-name-1", "gpu-box-with-a-long-name-2"):
        spawn_worker(name, *HANDLERS, "--label", "pool=gpu", "--label", "zone=eu-west-1")
    with SyncRequester(broker.requester_url) as requester:
        for _ in range(5):
            requester.request("sleep_ms", {"ms": 1})
    made = broker.manage("createsuperuser", "--noinput", "--username", "root",
                         "--email", "root@example.com",
                         env={"DJANGO_SUPERUSER_PASSWORD": "a-long-test-password"})
    assert made.returncode == 0, made.stderr
    browser.get(broker.http_url + "/admin/login/")
    browser.find_element("name", "username").send_keys("root")
    browser.find_element("name", "password").send_keys("a-long-test-password")
    browser.find_element("css selector", "input[type=submit]").click()
    wait_for(lambda: "Site administration" in browser.page_source, 10, "logged in")
    page = "return document.querySelector('#result_list')"
    for path, rows_wanted in (("workersession", 2), ("requestrecord", 5)):
        browser.get(f"{broker.http_url}/admin/dispatch/{path}/")
        wait_for(lambda: len(browser.find_elements("css selector", "#result_list tbody tr"))
                 >= rows_wanted, 15, f"{path} rows listed")
        holder = browser.execute_script(page + ".parentElement")
        overflow = browser.execute_script(
            "return arguments[0].scrollWidth - arguments[0].clientWidth", holder)
        assert overflow <= 0, f"{path}: {overflow} px behind a scrollbar"
        heights = browser.execute_script(
            page + ".querySelectorAll('tbody tr').length && [...document.querySelectorAll("
            "'#result_list tbody tr')].map(r => r.getBoundingClientRect().height)")
        assert max(heights) < 40, f"{path}: rows of {heights} px (wrapped)"
        if path == "workersession":
            assert "online" in browser.find_element("id", "result_list").text
