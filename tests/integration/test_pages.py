"""The operators' pages (SPEC §13) on a real PostgreSQL: over HTTP to the app `serve` builds,
in-process (status codes, sign-in, escaping, buttons, pages of runs), the hourly timeline service
under them, and in a real headless Chromium against a real `serve` (sign in, retry, text never run,
dark mode, a read-only session).

The browser tests save a screenshot of every page: under $SCREENSHOTS_DIR when set (the README's
are refreshed with `SCREENSHOTS_DIR=docs/screenshots .venv/bin/pytest -n 0 tests/integration/test_pages.py`),
else in a temporary directory, so a test run leaves the committed pictures alone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import sqlalchemy as sa

from db.daemons import DaemonRecords
from db.errors import DatabaseUnavailable, UsageError
from jobs.clock import ScaledClock
from jobs.events import CHECKER, PROCESSOR
from jobs.timeline import hourly_timeline
from tests.helpers import insert_run, make_runtime, rows
from tests.integration.test_api import failed_run, snapshot
from tests.integration.test_api_auth import signed_in
from tests.integration.test_cli import cli
from tests.web import ADMIN, READER, InProcessWeb, ThreadedWebServer, WebServer

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc)
PAGES = ("/", "/runs", "/dead-letters", "/stats")
SCRIPT = "<script>alert(1)</script>"
SCREENSHOTS = Path(os.environ.get("SCREENSHOTS_DIR") or Path(tempfile.gettempdir()) / "stuck-runs-screenshots")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def spent_chain(engine, budget: int = 4) -> uuid.UUID:
    """A chain whose every retry failed: its latest attempt is retry `budget` of `budget`."""
    root = failed_run(engine, search_query="Spent chain", failure_pattern="server_error")
    latest = root
    for number in range(1, budget + 1):
        latest = failed_run(
            engine,
            search_query="Spent chain",
            retry_count=number,
            max_retries=budget,
            is_retry=True,
            original_run_id=root,
            failure_pattern="server_error",
            started_at=NOW - timedelta(hours=3) + timedelta(minutes=number),
        )
    return latest


def dead_letter(engine, run_id, detail: str, pattern: str = "server_error") -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern, last_error, detail,"
                " inputs) VALUES (:r, :r, 5, 4, :p, 'HTTP 503 from the site', :d,"
                ' \'{"search_query": "Spent chain", "location_query": "Belgium"}\')'
            ),
            {"r": run_id, "d": detail, "p": pattern},
        )


def ended(
    engine, at: datetime, *, retry: bool, status: str, pattern: str | None = None, root=None, number: int = 1
) -> uuid.UUID:
    """An attempt stuck-runs handled that ended at `at`: retry `number` of `root`, or a stuck detection."""
    columns = {"is_retry": True, "retry_count": number, "original_run_id": root} if retry else {}
    with engine.begin() as conn:
        return insert_run(
            conn,
            status=status,
            started_at=at - timedelta(minutes=20),
            completed_at=at,
            failure_pattern=pattern,
            error_message="Run stuck for 1.2h - retry 1/4 scheduled" if pattern == "stuck" else None,
            **columns,
        )


# -- sign-in and access ------------------------------------------------------------------------------


def test_every_page_sends_a_browser_that_is_not_signed_in_to_the_sign_in_page(web, engine):
    run_id = failed_run(engine)
    with web.client() as http:
        for path in (*PAGES, f"/runs/{run_id}"):
            answer = http.get(path)
            back = "/login?" + urlencode({"next": path})  # and back here once signed in
            assert (answer.status_code, answer.headers.get("location")) == (303, back), path
            http.cookies.set("stuck_runs_session", "admin.9999999999." + "0" * 64)  # forged
            assert http.get(path).headers.get("location") == back, path
            http.cookies.clear()
        login = http.get("/login")
    assert login.status_code == 200 and login.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/login">' in login.text and 'name="token"' in login.text


def test_the_sign_in_page_s_form_signs_in_and_a_wrong_token_is_said_on_the_page(web):
    with web.client(Accept="text/html") as http:
        wrong = http.post("/login", data={"token": "not-a-token-of-this-server"})
        right = http.post("/login", data={"token": READER})
        overview = http.get("/")
    assert wrong.status_code == 401 and "neither ADMIN_TOKEN nor READ_TOKEN" in wrong.text
    assert "set-cookie" not in wrong.headers
    assert right.status_code == 303 and right.headers["location"] == "/"
    assert overview.status_code == 200 and "<h1>Overview</h1>" in overview.text


def test_pages_answer_html_with_a_strict_content_security_policy_and_only_our_own_assets(web, engine):
    run_id = failed_run(engine)
    http, _ = signed_in(web, READER)
    for path in (*PAGES, f"/runs/{run_id}"):
        answer = http.get(path)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-type"].startswith("text/html")
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", answer.text), path
        assert "<script>" not in answer.text and " on" + "click=" not in answer.text  # no inline script, no handler
        for asset in re.findall(r"""(?:src|href)="(/static/[^"]+)\"""", answer.text):
            assert http.get(asset).status_code == 200, asset
    assert (
        http.get("/static/pages.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    )
    assert http.get("/static/../pages.py").status_code == 404
    http.close()


def test_a_read_only_session_sees_no_action_button_and_an_admin_does(web, engine):
    failed = failed_run(engine)
    spent = spent_chain(engine)
    dead_letter(engine, spent, "Traceback (most recent call last): ...")
    reader, _ = signed_in(web, READER)
    admin, _ = signed_in(web, ADMIN)
    for path in (f"/runs/{failed}", "/dead-letters"):
        assert "data-post" not in reader.get(path).text, path
    chain = admin.get(f"/runs/{failed}").text
    assert f'data-post="/api/runs/{failed}/retry">Retry (1/4)</button>' in chain
    assert 'data-post="/api/dead-letters/1/requeue">Requeue</button>' in admin.get("/dead-letters").text
    spent_page = admin.get(f"/runs/{spent}").text
    assert '<button type="button" disabled>Max retries reached (4/4) · Permanent failure</button>' in spent_page
    assert "Max retries reached (4/4) · Permanent failure" in reader.get(f"/runs/{spent}").text
    before = snapshot(engine)
    refused = reader.post(f"/api/runs/{failed}/retry", headers={"Origin": web.base})
    assert refused.status_code == 403 and snapshot(engine) == before  # and the API refuses it anyway
    reader.close()
    admin.close()


def test_the_retry_button_counts_the_chain_s_next_retry_and_its_budget(web, engine):
    root = failed_run(engine, max_retries=6)
    second = failed_run(engine, retry_count=1, max_retries=6, is_retry=True, original_run_id=root)
    http, _ = signed_in(web, ADMIN)
    page = http.get(f"/runs/{root}").text  # the chain's page from its first run: the latest attempt is retried
    assert f'data-post="/api/runs/{second}/retry">Retry (2/6)</button>' in page
    assert page.index(f'/runs/{root}"') < page.index(f'/runs/{second}"')  # oldest first
    assert http.post(f"/api/runs/{second}/retry", headers={"Origin": web.base}).status_code == 200
    pending = http.get(f"/runs/{root}").text
    assert '/retry">' not in pending and "is already scheduled for retry" in pending
    assert pending.count('class="badge pending_retry"') == 1
    http.close()


# -- text from the database ----------------------------------------------------------------------------


def test_text_from_the_database_is_escaped_on_every_page(web, engine):
    hostile = failed_run(engine, search_query=SCRIPT, error_message='<img src=x onerror="alert(2)">')
    dead_letter(engine, hostile, "</pre><script>alert(3)</script>", pattern="<b>bold</b>")
    http, _ = signed_in(web, ADMIN)
    pages = [http.get(p).text for p in ("/runs", f"/runs/{hostile}", "/dead-letters", f"/runs?q={SCRIPT}")]
    for text in pages:
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>bold" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0] and "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[3]
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in pages[1]
    assert "&lt;/pre&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in pages[2] and "&lt;b&gt;bold&lt;/b&gt;" in pages[2]
    http.close()


# -- the runs page ---------------------------------------------------------------------------------------


def test_the_runs_page_filters_and_pages_by_keyset_links(web, engine):
    with engine.begin() as conn:
        for n in range(55):
            insert_run(conn, status="completed", search_query=f"job {n:02d}", started_at=NOW - timedelta(minutes=n))
        insert_run(conn, status="failed", search_query="broken job", started_at=NOW - timedelta(days=3))
    http, _ = signed_in(web, READER)
    first = http.get("/runs").text
    assert first.count('<tr>\n    <td><a href="/runs/') == 50 and "job 00" in first and "job 49" in first
    [later] = re.findall(r'<a rel="next" href="([^"]+)"', first)
    second = http.get(later.replace("&amp;", "&")).text
    assert "job 50" in second and "job 54" in second and "broken job" in second and "job 49" not in second
    assert 'rel="next"' not in second and "« First page" in second and 'rel="prev"' in second
    failed = http.get("/runs", params={"status": "failed"}).text
    assert "broken job" in failed and "job 00" not in failed
    recent = http.get("/runs", params={"since": "1d", "q": "JOB 0"}).text
    assert "job 03" in recent and "job 13" not in recent and "broken job" not in recent
    bad = http.get("/runs", params={"since": "soon"})
    assert bad.status_code == 400 and "since=" in bad.text and "is not a duration" in bad.text
    assert http.get("/runs", params={"cursor": "nonsense"}).status_code == 400
    assert http.get("/runs", params={"q": "x" * 201}).status_code == 400
    http.close()


def test_a_chain_page_for_a_run_that_is_not_there_is_a_404_page(web):
    http, _ = signed_in(web, READER)
    missing = http.get(f"/runs/{uuid.uuid4()}")
    malformed = http.get("/runs/not-a-run-id")
    assert missing.status_code == 404 and "Run not found" in missing.text
    assert missing.headers["content-type"].startswith("text/html")
    assert malformed.status_code == 400 and "is not a run id" in malformed.text
    http.close()


# -- the hourly timeline: one service for the API and the overview's chart ------------------------------


def test_the_hourly_api_and_the_overview_read_the_same_hours(web, engine):
    hour = (NOW - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    root = ended(engine, hour + timedelta(minutes=10), retry=False, status="failed", pattern="stuck")
    ended(engine, hour + timedelta(minutes=40), retry=True, status="completed", root=root)
    ended(
        engine,
        hour + timedelta(hours=2, minutes=1),
        retry=True,
        status="failed",
        pattern="server_error",
        root=root,
        number=2,
    )
    ended(engine, NOW - timedelta(days=8), retry=True, status="completed", root=root, number=3)  # outside the window
    with web.client(READER) as http:
        answer = http.get("/api/stats/hourly", params={"since": "7d"})
        too_long = http.get("/api/stats/hourly", params={"since": "90d"})
    assert answer.status_code == 200, answer.text
    hours = answer.json()["data"]["hours"]
    assert len(hours) == 7 * 24 + 1
    busy = {
        h["hour"]: (h["retries_succeeded"], h["retries_failed"], h["stuck_detections"])
        for h in hours
        if h["retries"] or h["stuck_detections"]
    }
    assert busy == {hour.isoformat(): (1, 0, 1), (hour + timedelta(hours=2)).isoformat(): (0, 1, 0)}
    assert too_long.status_code == 400 and "at most 31d" in too_long.json()["error"]
    http, _ = signed_in(web, READER)
    overview = http.get("/").text
    http.close()
    assert f"{hour:%Y-%m-%d %H}:00 UTC: 1 retries succeeded, 0 failed, 1 stuck detections" in overview
    assert overview.count('<rect class="ok"') == 2 and overview.count('<circle class="stuck"') == 1
    assert "2 hour(s) with activity" in overview


def test_the_timeline_counts_utc_hours_and_its_window_starts_on_an_hour(db_url, engine):
    now = datetime(2026, 5, 4, 10, 30, tzinfo=timezone.utc)
    root = ended(
        engine, datetime(2026, 5, 4, 9, 59, 59, tzinfo=timezone.utc), retry=False, status="failed", pattern="stuck"
    )
    ended(engine, datetime(2026, 5, 4, 8, 0, tzinfo=timezone.utc), retry=True, status="completed", root=root)
    ended(engine, datetime(2026, 5, 4, 6, 59, tzinfo=timezone.utc), retry=True, status="completed", root=root, number=2)
    with engine.begin() as conn:  # a retry cancelled before it ran is no outcome
        insert_run(
            conn,
            status="cancelled",
            is_retry=True,
            retry_count=3,
            original_run_id=root,
            completed_at=datetime(2026, 5, 4, 8, 5, tzinfo=timezone.utc),
        )
    rt = make_runtime(db_url)
    rt.clock = ScaledClock(now, 1)
    try:
        timeline = hourly_timeline(rt, timedelta(hours=3))
        with pytest.raises(UsageError, match="at most 31d"):
            hourly_timeline(rt, timedelta(days=32))
    finally:
        rt.engine.dispose()
    assert timeline.since == datetime(2026, 5, 4, 7, tzinfo=timezone.utc)
    assert [(h.hour.hour, h.retries_succeeded, h.stuck_detections) for h in timeline.hours] == [
        (7, 0, 0),
        (8, 1, 0),
        (9, 0, 1),
        (10, 0, 0),
    ]


def test_the_timeline_reads_the_ended_attempts_index(db_url):
    rt = make_runtime(db_url)
    try:
        compiled = rt.queries.hourly().compile(dialect=rt.engine.dialect)
        with rt.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            explained = conn.exec_driver_sql("EXPLAIN " + str(compiled), {**compiled.params, "sr_since": NOW})
            plan = "\n".join(r[0] for r in explained)
    finally:
        rt.engine.dispose()
    assert "ix_scrape_runs_ended_attempts" in plan, plan


def test_the_timeline_gives_up_at_its_statement_timeout(db_url, engine, monkeypatch):
    monkeypatch.setattr("jobs.timeline.DASHBOARD_STATEMENT_TIMEOUT_MS", 300)
    rt = make_runtime(db_url)
    locker = engine.connect()
    locker.begin()
    locker.exec_driver_sql("LOCK TABLE scrape_runs IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(6, locker.rollback)
    release.start()
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable, match="statement timeout"):
            hourly_timeline(rt)
    finally:
        release.cancel()
        locker.rollback()
        locker.close()
        rt.engine.dispose()
    assert time.monotonic() - started < 5


# -- in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no headless browser: install the Debian packages chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page_server(db_url):
    """`serve`'s app on a real socket for the browser, from a thread of this process: the browser
    tests but the first (which drives a real `serve` process) need the pages, not the process."""
    server = ThreadedWebServer(db_url)
    yield server
    server.stop()


def until(driver, condition, timeout: float = 20):
    """`condition` met within `timeout`; asked again when the page replaced an element while it read it
    (a refresh swaps #live: the element it found can be gone by the time it reads its text)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def sign_in(driver, web: WebServer, token: str, first: str = "/") -> None:
    """Opens `first` with no session, lands on the sign-in page, signs in there with `token`."""
    from selenium.webdriver.common.by import By

    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    driver.get(web.base + first)
    assert urlsplit(driver.current_url).path == "/login"
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()
    # Back on the page it asked for, not the overview.
    until(driver, lambda d: urlsplit(d.current_url).path == urlsplit(first).path and d.find_elements(By.TAG_NAME, "h1"))


def screenshot(driver, name: str) -> None:
    """The whole page, not only the window, as <SCREENSHOTS>/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1280, "height": min(max(height, 700), 2400), "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
        assert (SCREENSHOTS / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return True
    raise AssertionError(f"the page opened an alert: {text!r}")


def week_of_activity(engine, db_url) -> None:
    """A week that looks like production: stuck detections, retries that worked or not, live daemons."""
    for n in range(36):
        at = NOW - timedelta(hours=3 + n * 4.3)
        root = ended(engine, at, retry=False, status="failed", pattern="stuck")
        ended(engine, at + timedelta(hours=1), retry=True, status="failed" if n % 4 == 0 else "completed", root=root)
    rt = make_runtime(db_url)
    records = DaemonRecords(rt.runs.table.schema, rt.runs.qualified_name)
    jobs = {CHECKER: (NOW + timedelta(minutes=40)).isoformat(), PROCESSOR: (NOW + timedelta(minutes=10)).isoformat()}
    with rt.engine.begin() as conn:
        daemon = conn.execute(records.register("scraper-01", 4242, NOW, jobs)).scalar_one()
        for job_id, counts in ((CHECKER, {"found": 2, "failed": 2}), (PROCESSOR, {"due": 3, "succeeded": 2})):
            run = conn.execute(records.job_started(daemon, job_id, "scraper-01", 4242, NOW)).scalar_one()
            conn.execute(records.job_finished(run, NOW, "ok", counts, None, None))
    rt.engine.dispose()


def test_in_a_browser_sign_in_open_a_failed_chain_and_retry_it(browser, served, engine, db_url):
    from selenium.webdriver.common.by import By

    week_of_activity(engine, db_url)
    run_id = failed_run(engine, search_query="Data Architect", error_message="HTTP 503 from the site")
    spent = spent_chain(engine)
    dead_letter(
        engine,
        spent,
        'Traceback (most recent call last):\n  File "scrape.py", line 88, in fetch\n'
        "    raise ServerError(503)\nServerError: HTTP 503 from the site",
    )
    sign_in(browser, served, ADMIN, first=f"/runs/{run_id}")  # and it lands there
    assert "Retry (1/4)" in browser.find_element(By.ID, "live").text
    browser.get(served.base + "/")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart"))
    screenshot(browser, "overview")
    browser.get(f"{served.base}/runs/{run_id}")
    button = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "button[data-post]"))
    assert button.text == "Retry (1/4)"
    screenshot(browser, "chain")
    button.click()
    until(browser, lambda d: "pending_retry" in d.find_element(By.ID, "live").text)
    assert browser.find_element(By.ID, "flash").text == "Run scheduled for retry (attempt 1/4)"
    assert not browser.find_elements(By.CSS_SELECTOR, "button[data-post$='/retry']")  # the chain has its retry now
    assert browser.find_element(By.CSS_SELECTOR, "button[data-post$='/cancel']").text == "Cancel retry"
    with engine.connect() as conn:
        [retry] = rows(conn, "original_run_id = :root AND status = 'pending_retry'", root=run_id)
    assert retry["retry_count"] == 1 and str(retry["id"]) in browser.find_element(By.ID, "live").text
    screenshot(browser, "chain-retried")
    # The same retry through the CLI and the API: the same row, but for its id and its times.
    by_cli, by_api = (
        failed_run(engine, search_query="Data Architect", error_message="HTTP 503 from the site") for _ in range(2)
    )
    assert cli("retry", str(by_cli), env={"DATABASE_URL": db_url}).returncode == 0
    with served.client(ADMIN) as http:
        assert http.post(f"/api/runs/{by_api}/retry").status_code == 200

    def retry_of(root) -> dict:
        with engine.connect() as conn:
            [found] = rows(conn, "original_run_id = :root", root=root)
        return {k: v for k, v in found.items() if k not in ("id", "original_run_id", "next_retry_at", "updated_at")}

    assert retry_of(run_id) == retry_of(by_cli) == retry_of(by_api)
    browser.get(f"{served.base}/runs/{spent}")
    assert "Max retries reached (4/4) · Permanent failure" in browser.find_element(By.ID, "live").text
    for path, name in (("/runs", "runs"), ("/dead-letters", "dead-letters"), ("/stats", "stats")):
        browser.get(served.base + path)
        if name == "dead-letters":
            browser.find_element(By.CSS_SELECTOR, "details summary").click()
        screenshot(browser, name)
    policy = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert policy == []


def test_a_pending_retry_s_make_due_now_button_is_an_admin_s_and_same_origin(web, engine):
    from tests.helpers import insert_due_retry

    with engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=datetime.now(timezone.utc) + timedelta(hours=3))
    reader, _ = signed_in(web, READER)
    admin, _ = signed_in(web, ADMIN)
    button = f'data-post="/api/runs/{retry}/due-now">Make due now</button>'
    assert button in admin.get(f"/runs/{root}").text
    assert "Make due now" not in reader.get(f"/runs/{root}").text
    before = snapshot(engine)
    for http, origin in ((reader, web.base), (admin, "http://evil.example"), (admin, "null")):
        assert http.post(f"/api/runs/{retry}/due-now", headers={"Origin": origin}).status_code == 403
    assert snapshot(engine) == before
    assert admin.post(f"/api/runs/{retry}/due-now", headers={"Origin": web.base}).status_code == 200
    assert "Make due now" not in admin.get(f"/runs/{root}").text  # due now: nothing left to hurry
    reader.close()
    admin.close()


def test_in_a_browser_an_admin_makes_a_pending_retry_due_now(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    from tests.helpers import insert_due_retry

    later = datetime.now(timezone.utc) + timedelta(hours=3)
    with engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=later)
    sign_in(browser, page_server, ADMIN, first=f"/runs/{root}")
    browser.get(f"{page_server.base}/runs/{root}")
    due_now = f'button[data-post="/api/runs/{retry}/due-now"]'
    button = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, due_now))
    assert button.text == "Make due now"
    button.click()
    until(browser, lambda d: d.find_element(By.ID, "flash").text)
    assert browser.find_element(By.ID, "flash").text == "Retry 1/4 of Data Architect in Belgium is due now"
    until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, due_now))  # refreshed: due now
    with engine.connect() as conn:
        [pending] = rows(conn, "id = :id", id=retry)
    assert pending["status"] == "pending_retry" and pending["next_retry_at"] < later - timedelta(hours=2)
    assert no_alert(browser)


def test_in_a_browser_a_script_in_a_query_is_shown_as_text_and_never_run(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    hostile = failed_run(engine, search_query=SCRIPT, error_message='<img src=x onerror="alert(2)">')
    sign_in(browser, page_server, READER)
    for path in ("/runs", f"/runs/{hostile}"):
        browser.get(page_server.base + path)
        until(browser, lambda d: d.find_elements(By.ID, "live"))
        assert no_alert(browser), path
        assert SCRIPT in browser.find_element(By.ID, "live").text, path
    assert browser.execute_script("return document.querySelectorAll('#live script, #live img').length") == 0


def test_in_a_browser_pages_follow_the_system_s_dark_mode(browser, page_server, engine, db_url):
    from selenium.webdriver.common.by import By

    week_of_activity(engine, db_url)
    run_id = spent_chain(engine)
    sign_in(browser, page_server, READER)
    background = "return getComputedStyle(document.body).backgroundColor"
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]}
    )
    light = browser.execute_script(background)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    dark = browser.execute_script(background)
    screenshot(browser, "overview-dark")
    browser.get(f"{page_server.base}/runs/{run_id}")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "ol.timeline"))
    assert browser.execute_script(background) == dark
    screenshot(browser, "chain-dark")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert light != dark
    assert sum(map(int, re.findall(r"\d+", dark)[:3])) < 150 < sum(map(int, re.findall(r"\d+", light)[:3]))


def test_in_a_browser_a_read_only_session_has_no_retry_button_and_signs_out(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    run_id = failed_run(engine)
    dead_letter(engine, spent_chain(engine), "Traceback ...")
    sign_in(browser, page_server, READER, first=f"/runs/{run_id}")
    for path in (f"/runs/{run_id}", "/dead-letters"):
        browser.get(page_server.base + path)
        until(browser, lambda d: d.find_elements(By.ID, "live"))
        assert browser.find_elements(By.TAG_NAME, "button") == [
            browser.find_element(By.CSS_SELECTOR, ".sign-out button")
        ]
        assert "Retry (" not in browser.find_element(By.ID, "live").text
    browser.find_element(By.CSS_SELECTOR, ".sign-out button").click()
    until(browser, lambda d: urlsplit(d.current_url).path == "/login")
    browser.get(page_server.base + "/stats")
    assert urlsplit(browser.current_url).path == "/login"  # signed out


def test_in_a_browser_a_visible_page_refreshes_itself(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    run_id = failed_run(engine)
    sign_in(browser, page_server, READER)
    browser.get(f"{page_server.base}/runs/{run_id}")
    browser.execute_script("window.stillThisDocument = true")
    assert "pending_retry" not in browser.find_element(By.ID, "live").text
    with page_server.client(ADMIN) as http:
        assert http.post(f"/api/runs/{run_id}/retry").status_code == 200
    until(browser, lambda d: "pending_retry" in d.find_element(By.ID, "live").text, timeout=25)
    assert browser.execute_script("return window.stillThisDocument") is True  # refreshed in place, not reloaded


def test_in_a_browser_a_hidden_page_does_not_refresh(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    run_id = failed_run(engine)
    sign_in(browser, page_server, READER)
    browser.get(f"{page_server.base}/runs/{run_id}")
    until(browser, lambda d: d.find_elements(By.ID, "live"))
    browser.execute_script(
        """
        window.hiddenFetches = 0; window.visibleFetches = 0; window.wasHidden = false;
        const fetched = window.fetch;
        window.fetch = (...args) => {
          if (document.visibilityState === "hidden") window.hiddenFetches++; else window.visibleFetches++;
          return fetched(...args);
        };
        document.addEventListener("visibilitychange", () => { window.wasHidden ||= document.hidden; });
        document.getElementById("live").dataset.refresh = "1";  // every second from the next schedule on
        """
    )
    page = browser.current_window_handle
    browser.switch_to.new_window("tab")
    time.sleep(3.5)
    browser.close()
    browser.switch_to.window(page)
    until(browser, lambda d: d.execute_script("return window.visibleFetches") >= 1)  # visible again: refreshes
    assert browser.execute_script("return [window.wasHidden, window.hiddenFetches]") == [True, 0]


def test_without_tokens_the_sign_in_page_sends_the_browser_to_the_overview(db_url):
    web = InProcessWeb(db_url, tokens=False)
    try:
        with web.client() as http:
            answer = http.get("/login")
            overview = http.get("/")
    finally:
        web.stop()
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    assert overview.status_code == 200


def test_a_dead_letters_inputs_are_shown_as_json_on_the_page_and_by_dlq_show(web, engine, db_url):
    """Not Python's reprs (`{'pages': 3}`, `None`, `'Belgium'`): what a script or a person can paste."""
    spent = spent_chain(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern, last_error, inputs)"
                " VALUES (:r, :r, 5, 4, 'server_error', 'HTTP 503', CAST(:i AS jsonb))"
            ),
            {"r": spent, "i": '{"config": {"pages": 3}, "results_count": null, "location_query": "Belgium"}'},
        )
    reader, _ = signed_in(web, READER)
    page = reader.get("/dead-letters").text
    reader.close()
    assert "<dd>{&#34;pages&#34;: 3}</dd>" in page and "<dd>null</dd>" in page, page
    assert "<dd>&#34;Belgium&#34;</dd>" in page
    assert "None" not in page and "&#39;pages&#39;" not in page
    shown = cli("dlq", "show", "1", env={"DATABASE_URL": db_url})
    assert shown.returncode == 0, shown.stderr
    assert '        config = {"pages": 3}' in shown.stdout.splitlines(), shown.stdout
    assert "        results_count = null" in shown.stdout.splitlines()
    assert '        location_query = "Belgium"' in shown.stdout.splitlines()


def test_the_runs_pages_window_is_named_by_the_time_that_describes_the_status(web, engine):
    with engine.begin() as conn:
        insert_run(conn, status="pending_retry", search_query="Due soon", next_retry_at=NOW + timedelta(hours=1))
    reader, _ = signed_in(web, READER)
    assert "Started within <input" in reader.get("/runs", params={"since": "24h"}).text
    pending = reader.get("/runs", params={"status": "pending_retry", "since": "24h"}).text
    assert "Due within <input" in pending and "Due soon" in pending and "No run matches" not in pending
    assert "Ended within <input" in reader.get("/runs", params={"status": "cancelled"}).text
    reader.close()


def test_permanently_failed_is_one_24h_count_named_alike_by_status_json_api_and_overview(web, engine, db_url):
    """A chain dead-lettered three days ago is outside the window everywhere; one of an hour ago in it."""
    for ended_ago in (timedelta(days=3), timedelta(hours=1)):
        root = failed_run(
            engine,
            failure_pattern="stuck",
            started_at=NOW - ended_ago - timedelta(hours=3),
            completed_at=NOW - ended_ago - timedelta(hours=2),
            max_retries=1,
        )
        failed_run(
            engine,
            is_retry=True,
            retry_count=1,
            max_retries=1,
            original_run_id=root,
            failure_pattern="server_error",
            started_at=NOW - ended_ago - timedelta(minutes=30),
            completed_at=NOW - ended_ago,
        )
    env = {"DATABASE_URL": db_url}
    text = cli("status", env=env)
    assert text.returncode == 0, text.stderr
    assert "permanently failed (24h): 1 (chains ended failed, no retry coming)" in text.stdout, text.stdout
    counts = json.loads(cli("status", "--json", env=env).stdout)["runs"]
    assert (counts["permanently_failed"], counts["permanently_failed_window"]) == (1, "24h")
    reader, _ = signed_in(web, READER)
    api = reader.get("/api/status").json()["data"]["runs"]
    assert (api["permanently_failed"], api["permanently_failed_window"]) == (1, "24h")
    overview = reader.get("/").text
    reader.close()
    assert '>Permanently failed (24h)</a></h2><p class="number"><a href="/dead-letters">1</a></p>' in overview, overview


# -- issue 19: navigation, sign-in's way back, actions on the overview and the chain ------------------


def test_sign_in_returns_to_the_page_asked_for_and_never_to_another_host(web, engine):
    run_id = failed_run(engine)
    asked = f"/runs/{run_id}?x=1"
    with web.client(Accept="text/html") as http:
        sent = http.get(asked)
        form = http.get(sent.headers["location"])
        signed = http.post("/login", data={"token": READER, "next": asked})
        evil = [
            http.post("/login", data={"token": READER, "next": target}).headers["location"]
            for target in (
                "//evil.example",
                "https://evil.example",
                "/\\evil.example",
                "/%2F%2Fevil.example",
                "/%5Cevil.example",
            )
        ]
        wrong = http.post("/login", data={"token": "not-a-token-of-this-server", "next": asked})
    assert sent.headers["location"] == "/login?" + urlencode({"next": asked})
    assert f'<input type="hidden" name="next" value="/runs/{run_id}?x=1">' in form.text
    assert signed.status_code == 303 and signed.headers["location"] == asked
    assert evil == ["/"] * 5
    assert wrong.status_code == 401 and f'name="next" value="/runs/{run_id}?x=1"' in wrong.text  # kept for the next try


def test_an_unknown_page_is_an_html_page_and_an_unknown_api_path_json(web):
    http, _ = signed_in(web, READER)
    page = http.get("/no-such-page")
    api = http.get("/api/no-such-thing")
    get_on_post = http.get("/logout")
    http.close()
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Page not found</h1>" in page.text and 'href="/runs"' in page.text  # the navigation is there
    assert api.status_code == 404 and api.json()["success"] is False
    assert get_on_post.status_code == 405 and get_on_post.headers["allow"] == "POST"


def test_a_bad_started_within_shows_the_form_again_with_the_problem(web, engine):
    http, _ = signed_in(web, READER)
    bad = http.get("/runs", params={"since": "soon", "q": "keep me", "status": "failed"})
    http.close()
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("text/html")
    assert '<form class="filters" method="get" action="/runs">' in bad.text
    assert 'name="q" value="keep me"' in bad.text and '<option value="failed" selected>' in bad.text
    assert 'id="filter-problem"' in bad.text and "is not a duration" in bad.text and 'value="soon"' in bad.text


def test_the_overview_s_cards_link_to_the_runs_they_count(web, engine):
    http, _ = signed_in(web, READER)
    overview = http.get("/").text
    http.close()
    for link in (
        "/runs?status=running",
        "/runs?status=stuck",
        "/runs?status=pending_retry&amp;order=due",
        "/dead-letters",
    ):
        assert f'<a href="{link}">' in overview, link


def test_the_runs_page_shows_stuck_runs_due_times_and_pages_back(db_url, engine):
    with engine.begin() as conn:
        insert_run(conn, search_query="stuck one", started_at=NOW - timedelta(minutes=50))
        insert_run(conn, search_query="young one", started_at=NOW - timedelta(minutes=5))
        due = NOW + timedelta(hours=3)
        insert_run(
            conn, status="pending_retry", search_query="waiting one", is_retry=True, retry_count=1, next_retry_at=due
        )
        for n in range(60):
            insert_run(
                conn, status="completed", search_query=f"job {n:02d}", started_at=NOW - timedelta(hours=1, minutes=n)
            )
    web = InProcessWeb(db_url, STUCK_AFTER="45m")
    try:
        http, _ = signed_in(web, READER)
        stuck_page = http.get("/runs", params={"status": "stuck"}).text
        started = http.get("/runs", params={"order": "started"}).text
        due_page = http.get("/runs", params={"order": "due"}).text
        [later] = re.findall(r'<a rel="next" href="([^"]+)"', started)
        second = http.get(later.replace("&amp;", "&")).text
        [earlier] = re.findall(r'<a rel="prev" href="([^"]+)"', second)
        back = http.get(earlier.replace("&amp;", "&")).text
        http.close()
    finally:
        web.stop()
    assert "stuck one" in stuck_page and "young one" not in stuck_page and "job 00" not in stuck_page
    assert "waiting one" not in started and started.index("young one") < started.index("job 00")  # not first
    assert f"{due:%Y-%m-%d %H:%M:%S} UTC" in due_page and "waiting one" in due_page and "job 00" not in due_page
    assert "order=started" in later and "job 59" in second and 'rel="prev"' not in back
    assert re.findall(r'<a href="/runs/[^"]+">([^<]+)</a>', back) == re.findall(
        r'<a href="/runs/[^"]+">([^<]+)</a>', started
    )


def test_the_chain_page_shows_the_run_s_inputs_and_a_cancel_button_to_an_admin(web, engine):
    root = failed_run(engine, search_query="Data Architect", location_query="Belgium")
    with engine.begin() as conn:
        pending = insert_run(
            conn,
            status="pending_retry",
            is_retry=True,
            retry_count=1,
            original_run_id=root,
            next_retry_at=NOW + timedelta(hours=1),
        )
    admin, _ = signed_in(web, ADMIN)
    reader, _ = signed_in(web, READER)
    page = admin.get(f"/runs/{root}").text
    read_only = reader.get(f"/runs/{root}").text
    ended = admin.get(f"/runs/{failed_run(engine)}").text
    foreign = admin.post(f"/api/runs/{pending}/cancel", headers={"Origin": "http://evil.example"})
    paused = admin.post("/api/pause", params={"for": "1h"}, headers={"Origin": "http://evil.example"})
    admin.close()
    assert foreign.status_code == 403 and paused.status_code == 403  # the same-origin rule
    reader.close()
    assert '<dl class="facts" id="inputs"><dt>search_query</dt><dd>Data Architect</dd>' in page
    assert f'data-post="/api/runs/{pending}/cancel">Cancel retry</button>' in page
    assert "Cancel retry" not in read_only and "Cancel retry" not in ended and 'id="inputs"' in read_only


def test_a_busy_hour_is_never_a_sliver_in_the_chart():
    from jobs.timeline import HourCounts, HourlyTimeline
    from scheduler.web.pages import MIN_MARK, hourly_chart

    hour = datetime(2026, 5, 4, 10, tzinfo=timezone.utc)
    timeline = HourlyTimeline(
        hour, (HourCounts(hour, retries_succeeded=1000), HourCounts(hour + timedelta(hours=1), 1, 1))
    )
    bars = hourly_chart(timeline)["bars"]
    assert bars[1]["ok_height"] >= MIN_MARK and bars[1]["failed_height"] >= MIN_MARK
    assert bars[1]["failed_y"] + bars[1]["failed_height"] == pytest.approx(bars[1]["ok_y"])
    assert bars[0]["ok_height"] == pytest.approx(160) and bars[0]["failed_height"] == 0


def test_in_a_browser_an_admin_cancels_a_pending_retry_on_its_chain(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    root = failed_run(engine)
    with engine.begin() as conn:
        pending = insert_run(
            conn,
            status="pending_retry",
            is_retry=True,
            retry_count=1,
            original_run_id=root,
            next_retry_at=NOW + timedelta(hours=1),
        )
    sign_in(browser, page_server, ADMIN, first=f"/runs/{root}")
    button = until(browser, lambda d: d.find_element(By.XPATH, "//button[text()='Cancel retry']"))
    button.click()
    until(browser, lambda d: "cancelled" in d.find_element(By.ID, "live").text)
    assert browser.find_element(By.ID, "flash").text == "Retry 1/4 cancelled"
    assert not browser.find_elements(By.XPATH, "//button[text()='Cancel retry']")
    with engine.connect() as conn:
        [cancelled] = rows(conn, "id = :id", id=pending)
    assert cancelled["status"] == "cancelled" and cancelled["error_message"] == "Cancelled by operator"
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d UTC|", browser.find_element(By.ID, "refresh-state").text)


def test_in_a_browser_an_admin_pauses_retries_for_a_while_and_resumes_them(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    sign_in(browser, page_server, ADMIN)
    browser.find_element(By.ID, "pause-for").send_keys("2h")
    browser.find_element(By.XPATH, "//button[text()='Pause retries']").click()
    until(browser, lambda d: d.find_elements(By.XPATH, "//button[text()='Resume retries']"))
    with page_server.client(READER) as http:
        pause = http.get("/api/status").json()["data"]["pause"]
    until_ = datetime.fromisoformat(pause["until"])
    assert timedelta(minutes=119) < until_ - datetime.now(timezone.utc) <= timedelta(hours=2)
    assert pause["paused_by"].startswith("api on ")
    browser.find_element(By.XPATH, "//button[text()='Resume retries']").click()
    until(browser, lambda d: d.find_elements(By.ID, "pause-for"))
    with page_server.client(READER) as http:
        assert http.get("/api/status").json()["data"]["pause"] is None
    # The refresh time, as every time on the pages: UTC.
    browser.execute_script('document.getElementById("live").dataset.refresh = "1"')
    browser.get(page_server.base + "/")
    browser.execute_script('document.getElementById("live").dataset.refresh = "1"')
    until(browser, lambda d: d.find_element(By.ID, "refresh-state").text)
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d UTC", browser.find_element(By.ID, "refresh-state").text)


def test_in_a_browser_a_read_only_session_has_no_pause_or_cancel_button(browser, page_server, engine):
    from selenium.webdriver.common.by import By

    root = failed_run(engine)
    with engine.begin() as conn:
        insert_run(conn, status="pending_retry", is_retry=True, retry_count=1, original_run_id=root, next_retry_at=NOW)
    sign_in(browser, page_server, READER)
    assert not browser.find_elements(By.ID, "pause-for")
    browser.get(f"{page_server.base}/runs/{root}")
    until(browser, lambda d: d.find_elements(By.ID, "inputs"))
    assert not browser.find_elements(By.XPATH, "//button[text()='Cancel retry']")
