"""The access rules' pure parts: tokens, session cookies, origins."""

from __future__ import annotations

import hmac

import pytest

from scheduler.web import auth
from scheduler.web.auth import ADMIN, READ, SESSION_SECONDS, Tokens, bearer, same_origin

TOKENS = Tokens(admin="adm-0123456789abcdef", read="rdr-0123456789abcdef")


def test_each_token_grants_its_role_and_nothing_else_grants_any():
    assert TOKENS.role_of("adm-0123456789abcdef") == ADMIN
    assert TOKENS.role_of("rdr-0123456789abcdef") == READ
    for other in ("", None, "adm-0123456789abcde", "adm-0123456789abcdef ", "ADM-0123456789ABCDEF", "x" * 10_000):
        assert TOKENS.role_of(other) is None
    assert Tokens(admin="adm-0123456789abcdef").role_of("") is None


def test_tokens_are_compared_as_equal_length_digests_and_both_always(monkeypatch):
    """The time a refusal takes tells nothing of the token: what is compared has one length
    whatever was presented, and a wrong token costs both comparisons, as a right one does."""
    calls = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for presented in ("a", "adm-0123456789abcdeX", "adm-0123456789abcdef", "y" * 5000):
        calls.clear()
        TOKENS.role_of(presented)
        assert calls == [(32, 32), (32, 32)], presented


def test_a_session_cookie_carries_its_role_until_it_expires():
    cookie = TOKENS.session_cookie(ADMIN, now=1_000_000)
    assert TOKENS.session_role(cookie, now=1_000_001) == ADMIN
    assert TOKENS.session_role(cookie, now=1_000_000 + SESSION_SECONDS) is None
    assert TOKENS.session_role(TOKENS.session_cookie(READ, now=5), now=6) == READ
    assert "adm-" not in cookie and "0123456789abcdef" not in cookie


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c.replace("admin.", "read.", 1),
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),
        lambda c: c.rsplit(".", 2)[0] + f".{10**12}." + c.rsplit(".", 1)[1],
        lambda c: "root" + c[5:],
        lambda c: c + "\udcff",
        lambda c: "",
    ],
)
def test_a_tampered_cookie_grants_nothing(tamper):
    cookie = TOKENS.session_cookie(ADMIN, now=100)
    assert TOKENS.session_role(tamper(cookie), now=101) is None


def test_a_cookie_signed_for_another_token_grants_nothing():
    cookie = TOKENS.session_cookie(ADMIN, now=100)
    assert Tokens(admin="adm-another-token-000", read=TOKENS.read).session_role(cookie, now=101) is None
    assert Tokens(read=TOKENS.read).session_role(cookie, now=101) is None


def test_bearer_reads_only_the_bearer_scheme():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc  ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer") is None
    assert bearer(None) is None


@pytest.mark.parametrize(
    ("origin", "site", "host", "expected"),
    [
        ("http://127.0.0.1:8080", None, "127.0.0.1:8080", True),
        ("http://127.0.0.1:8080", None, "127.0.0.1:9090", False),
        ("https://127.0.0.1:8080", None, "127.0.0.1:8080", False),
        ("http://evil.example", None, "127.0.0.1:8080", False),
        ("http://127.0.0.1:8080.evil.example", None, "127.0.0.1:8080", False),
        ("null", None, "127.0.0.1:8080", False),
        (None, None, "127.0.0.1:8080", False),
        (None, "same-origin", "127.0.0.1:8080", True),
        ("http://127.0.0.1:8080", "cross-site", "127.0.0.1:8080", False),
        (None, "same-site", "127.0.0.1:8080", False),
        ("http://evil.example", "same-origin", "127.0.0.1:8080", False),  # a contradicting Origin wins
        ("http://127.0.0.1:8080", "same-origin", None, False),
    ],
)
def test_same_origin(origin, site, host, expected):
    assert same_origin(origin, site, host, "http") is expected


def test_the_listening_socket_sends_small_writes_at_once():
    """Measured: without TCP_NODELAY, each keep-alive request after the first took 44 ms
    (a delayed ACK) against 1 ms with it (bench/web.py's server time stayed at 1 ms)."""
    import socket

    from scheduler.cli.web import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


@pytest.mark.parametrize(
    "wanted",
    [
        "/runs/7?status=failed&q=x",
        "/",
        "/runs?q=https%3A%2F%2Fexample.com",  # a URL as search text is text: the path is ours
        "/dead-letters",
    ],
)
def test_a_page_of_this_server_is_where_sign_in_returns(wanted):
    assert auth.local_path(wanted) == wanted


@pytest.mark.parametrize(
    "wanted",
    [
        "//evil.example",
        "https://evil.example/",
        "http:evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "%2F%2Fevil.example",
        "/%2Fevil.example",
        "/%5Cevil.example",
        "/%252F%252Fevil.example",  # encoded twice
        "/\t/evil.example",  # a browser drops the tab: //evil.example
        "/\n/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "",
        None,
    ],
)
def test_another_host_however_spelled_is_never_where_sign_in_returns(wanted):
    assert auth.local_path(wanted) == "/"
