"""SCRAPE_RUN_WEBHOOK (SPEC §12): a due retry is POSTed to the fleet's own API, which runs it.

It delivers one retry at a time (`Delivers`, jobs/executors/base.py): `deliver(run, stop)` POSTs
and reports the receiver's answer as an outcome. The hand-over around it (the retry committed
`running` and marked before the POST, confirmed or put back after it, delivered again with the
same `Idempotency-Key` only after a delivering process died) is jobs/delivery.py's.

What an answer means is decided by `judge`, pure: 2xx hands the retry over (its status line is
the receiver's word: a body cut short after it changes nothing); 429 and 503 (with a
`Retry-After` or not), a connection error or a timeout postpone it, no budget spent; any other
status is a failed attempt whose error names it, so the failure patterns (§7) decide: 404/410
and 401/403 end the chain. A redirect is followed only when it repeats the POST (307, 308) to the
same scheme, host and port.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import ssl
import threading
import time
from datetime import date, datetime, timedelta, timezone
from datetime import time as time_of_day
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote

import httpx

from jobs.executors.base import Strategies, T
from jobs.executors.outcome import DeliveryOutcome, Failed, HandedOver, OutcomeUnknown, Postponed, Released, clean
from jobs.executors.senders import ClientPerThread, Senders, answer_within
from jobs.model import Run
from jobs.patterns import bounded_retry_after

CONNECT_TIMEOUT = timedelta(seconds=5)
MAX_REDIRECTS = 5
ERROR_BODY_CHARS = 200  # of an error answer, kept in the attempt's error
SIGNATURE_HEADER = "X-Stuck-Runs-Signature"
POSTPONING = frozenset({429, 503})
KEEPS_THE_POST = frozenset({307, 308})  # the redirects that repeat the request, method and body


MODE = "webhook"  # the `handed_off` value of a retry delivered here


# A client per sending thread (`ClientPerThread`; Scrapyd's too), one call at a time each, so one
# connection kept alive (a redirect's answer is closed before it is followed), and no call ever
# queues in httpcore's pool (encode/httpcore#1110: a pool closing a connection it just gave out).
ONE_AT_A_TIME = httpx.Limits(max_connections=1, max_keepalive_connections=1)


def judge(
    status: int, reason: str = "", retry_after: str | None = None, body: str = ""
) -> HandedOver | Postponed | Failed:
    """What an HTTP answer means (SPEC §12): 2xx hands the retry over; 429 and 503 postpone it (to
    the `Retry-After` when the receiver said); anything else is a failed attempt."""
    if 200 <= status < 300:
        return HandedOver(MODE)
    after = retry_after_delay(retry_after)
    words = clean(f"HTTP {status} {reason}".strip())
    if status in POSTPONING:
        return Postponed(f"Webhook answered {words}", retry_after=after)
    detail = clean(" ".join(body.split()))[:ERROR_BODY_CHARS]
    return Failed(f"Webhook answered {words}" + (f": {detail}" if detail else ""), retry_after=after)


def retry_after_delay(value: str | None) -> timedelta | None:
    """A `Retry-After` in seconds or as an HTTP date; 0 or a date past: due now."""
    if not value:
        return None
    if value.strip().isdigit():
        return bounded_retry_after(value) if int(value) > 0 else timedelta(0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return bounded_retry_after((when - datetime.now(timezone.utc)).total_seconds()) or timedelta(0)


def _json_value(value: object) -> str:
    """What JSON cannot hold as such: timestamps in ISO 8601 with `T`, as the API writes them."""
    if isinstance(value, (datetime, date, time_of_day)):
        return value.isoformat()
    return str(value)


def payload(run: Run) -> bytes:
    """The JSON body: the run's inputs by their real names, its id and its place in the chain."""
    fields: dict[str, Any] = {
        **run.inputs,
        "id": run.id,
        "retry_count": run.retry_count,
        "max_retries": run.max_retries,
        "original_run_id": run.chain_id,
    }
    return json.dumps(fields, default=_json_value, ensure_ascii=False).encode("utf-8")


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def delivery_url(template: str, run: Run) -> str:
    """The template with each placeholder percent-encoded: an input is text in a path, never a `/`,
    `?` or `#` of the URL."""
    values = {name: quote("" if value is None else str(value), safe="") for name, value in run.inputs.items()}
    values["run_id"] = quote(str(run.id), safe="")
    return template.format_map(values)


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


class WebhookExecutor:
    """Delivers retries, a client per sending thread (`ClientPerThread`, keep-alive between deliveries)."""

    mode = MODE
    sends_again = True  # with the same Idempotency-Key: the receiver de-duplicates
    lanes = None  # a POST waits for the receiver's answer: one lane per slot of the cap

    def __init__(self, template: str, secret: str | None, timeout: timedelta) -> None:
        self.template, self.secret = template, secret
        connect = min(CONNECT_TIMEOUT, timeout).total_seconds()
        self.senders = Senders("webhook-post")
        self.timeout = httpx.Timeout(timeout.total_seconds(), connect=connect)
        # The system's trust store (and SSL_CERT_FILE): a receiver behind the company's own CA.
        # Read once: every sender's client shares it.
        tls = ssl.create_default_context()
        # Which process delivered, for the receiver's logs (and the chaos auditor's).
        headers = {
            "User-Agent": f"stuck-runs ({socket.gethostname()}; pid {os.getpid()})",
            "Accept-Encoding": "identity",  # an error page is read 4 KB at most, never inflated
        }
        self.clients = ClientPerThread(
            lambda: httpx.Client(
                timeout=self.timeout,
                limits=ONE_AT_A_TIME,
                follow_redirects=False,
                trust_env=False,  # no proxy from the environment: it would see every retry and its signature
                verify=tls,
                headers=headers,
                cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # each delivery stands alone
            )
        )
        # The longest one delivery lasts (`deliver` gives up then): its lease is this plus a margin.
        self.bound = timedelta(seconds=self.timeout.connect + self.timeout.read)

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.deliver(self)

    def post(self, run: Run) -> HandedOver | Postponed | Failed:
        """One POST of `run`, waited for as long as httpx's timeouts allow (`deliver` bounds it)."""
        body = payload(run)
        # Percent-encoded: a text id may hold what a header cannot (é, a newline); ASCII ids stay as they are.
        headers = {"Content-Type": "application/json", "Idempotency-Key": quote(str(run.id), safe="")}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        try:
            response = self._post(delivery_url(self.template, run), body, headers)
        except httpx.ConnectTimeout:
            return Postponed(f"Webhook did not accept a connection within {self.timeout.connect:g}s")
        except httpx.TimeoutException:
            return Postponed(f"Webhook did not answer within {self.timeout.read:g}s")
        except httpx.TransportError as exc:  # refused, reset, DNS, TLS: the fleet may be back later
            return Postponed(f"Webhook unreachable: {type(exc).__name__}: {clean(str(exc))}"[:500])
        except (httpx.HTTPError, ValueError) as exc:  # a malformed redirect, an id a URL cannot hold
            return Failed(f"Webhook delivery failed: {type(exc).__name__}")
        if isinstance(response, str):
            return Failed(response)
        answer, start = response
        return judge(answer.status_code, answer.reason_phrase, answer.headers.get("retry-after"), start)

    def deliver(self, run: Run, stop: threading.Event) -> DeliveryOutcome:
        """`post`, given up when `stop` is set (a signal): the process then stops at once and
        the retry is put back pending, its budget unspent. A delivery the receiver still takes
        after that is delivered again later with the same `Idempotency-Key`."""
        if stop.is_set():  # no POST once stopping: put back, and nothing is in flight
            return Released()
        posting = self.senders.submit(lambda: self._post_quietly(run))
        # httpx bounds each read, not the whole answer: a receiver dripping a byte a minute would
        # hold the row for days. The delivery as a whole gets connect + read timeout.
        deadline = time.monotonic() + self.bound.total_seconds()
        answered = answer_within(posting, stop, deadline)
        if answered is not None:
            return answered
        if not stop.is_set():
            return OutcomeUnknown(f"Webhook did not answer within {self.timeout.read:g}s")
        return OutcomeUnknown("Stopped by a signal before the fleet answered", stopping=True)

    def _post_quietly(self, run: Run) -> HandedOver | Postponed | Failed:
        try:
            return self.post(run)
        except Exception as exc:  # noqa: BLE001 - the client closed under a delivery given up on
            return Failed(f"Webhook delivery failed: {type(exc).__name__}")

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[httpx.Response, str] | str:
        """The answer (and the start of its body) after same-origin redirects, or why a redirect
        was not followed."""
        client = self.clients.get()
        request = client.build_request("POST", url, content=body, headers=headers)
        for _ in range(MAX_REDIRECTS + 1):
            response = client.send(request, stream=True)
            try:
                start = _body_start(response)
            except httpx.TransportError:
                # A 2xx hands the retry over (SPEC §12): a receiver that said so and died before its
                # body took it. Any other answer cut short is a connection error, postponed.
                if not response.is_success:
                    raise
                start = ""
            finally:
                response.close()
            if not response.is_redirect:
                return response, start
            if response.status_code not in KEEPS_THE_POST:
                # 301/302/303 would be followed with a GET and no body: a 2xx to that is no hand-off.
                return (
                    f"Webhook answered HTTP {response.status_code} {response.reason_phrase} (a redirect that drops "
                    "the POST): point SCRAPE_RUN_WEBHOOK at the final URL"
                )
            following = response.next_request
            if following is None or not same_origin(request.url, following.url):
                target = following.url.host if following is not None else "nowhere"
                return f"Webhook redirected to another host ({target}): not followed; point SCRAPE_RUN_WEBHOOK at the final URL"
            request = following
        return f"Webhook redirected more than {MAX_REDIRECTS} times: point SCRAPE_RUN_WEBHOOK at the final URL"

    def close(self) -> None:
        self.senders.close()
        self.clients.close()


BODY_READ_BYTES = 4096  # of an answer's body: enough for its error; a receiver's megabytes are not read


def _body_start(response: httpx.Response) -> str:
    read = b""
    for chunk in response.iter_bytes():
        read += chunk
        if len(read) >= BODY_READ_BYTES:
            break
    return read[:BODY_READ_BYTES].decode(response.encoding or "utf-8", "replace")
