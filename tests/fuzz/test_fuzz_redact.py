"""Property tests of `data_prep.storage.redact`: whatever a password holds (`@`, `/`, `:`,
spaces), no part of it is left in the redacted text, and secret-looking query values are
masked, wherever the URI sits in a line."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from data_prep.storage import public_uri, redact

settings.load_profile("bertflow-fuzz")
pytestmark = pytest.mark.timeout(90)

NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
# What a careless URI carries in a password: every printable ASCII character but the
# ones that end a URI in text (whitespace, quotes) and those that start a query/fragment.
SECRET = st.text("".join(chr(c) for c in range(33, 127) if chr(c) not in "?#\"'`<>"),
                 min_size=6, max_size=24)
SCHEME = st.sampled_from(["postgresql", "postgresql+psycopg2", "mysql", "http", "https"])
HOST = st.sampled_from(["db", "db.internal:5432", "10.0.0.7:5000", "[::1]:5000"])


def leaked(secret: str, shown: str) -> bool:
    """True when any 6 characters in a row of `secret` appear in `shown`."""
    pieces = [secret[i:i + 6] for i in range(0, max(1, len(secret) - 5))]
    return any(p in shown for p in pieces)


@given(SCHEME, NAME, SECRET, HOST, st.sampled_from(["", "/mlflow", "/a/b?x=1"]),
       st.sampled_from(["", "connecting to ", "error: "]),
       st.sampled_from(["", " failed", "\nnext"]))
def test_no_part_of_a_password_survives(scheme, user, secret, host, path, before, after):
    assume(not leaked(secret, f"{before}{scheme}://{user}:***@{host}{path}{after}"))
    text = f"{before}{scheme}://{user}:{secret}@{host}{path}{after}"
    shown = redact(text)
    assert not leaked(secret, shown), shown
    assert shown.startswith(f"{before}{scheme}://{user}:***@{host}")
    assert not leaked(secret, public_uri(f"{scheme}://{user}:{secret}@{host}{path}"))


@given(st.sampled_from(["password", "token", "secret", "api_key", "X-Amz-Signature",
                        "access_token", "sig"]),
       st.text("abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789+/=_.-%", min_size=6, max_size=30))
def test_secret_query_values_are_masked(name, value):
    assume("***" not in value)
    shown = redact(f"see https://host:5000/path?page=2&{name}={value}&sort=asc done")
    assert value not in shown
    assert f"&{name}=***&sort=asc done" in shown and "?page=2" in shown


@given(st.text(max_size=80))
def test_redact_never_fails_and_text_without_a_uri_is_unchanged(text):
    shown = redact(text)
    if "://" not in text and "=" not in text:
        assert shown == text
