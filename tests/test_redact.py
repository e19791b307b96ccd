"""One redaction for every printed or logged location: the review's cases,
and the places that printed locations raw."""

from __future__ import annotations

import pytest

from data_prep.storage import public_uri, redact


@pytest.mark.parametrize("text,shown", [
    ("postgresql://u:pa/ss@db:5432/m", "postgresql://u:***@db:5432/m"),
    ("postgresql://u:pa ss@db/m", "postgresql://u:***@db/m"),
    ("postgresql://u:p@ss@db/m", "postgresql://u:***@db/m"),
    ("postgresql://user@corp:pw@db/m", "postgresql://user@corp:***@db/m"),
    ("http://h:5000/x?password=hunter2&a=1", "http://h:5000/x?password=***&a=1"),
    ("see https://h/api?token=abc123#top", "see https://h/api?token=***#top"),
    ("s3://b/k?secret=s&X-Amz-Signature=f00&key=k1",
     "s3://b/k?secret=***&X-Amz-Signature=***&key=***"),
    # kept: no secret in them
    ("postgresql://mlflow@db:5432/m", "postgresql://mlflow@db:5432/m"),
    ("abfs://box@acct.dfs.core.windows.net/d", "abfs://box@acct.dfs.core.windows.net/d"),
    ("http://host:5000/x failed; mail admin@corp", "http://host:5000/x failed; mail admin@corp"),
    ("s3://bucket/p@v2/f", "s3://bucket/p@v2/f"),
])
def test_the_reviews_cases(text, shown):
    assert redact(text) == shown


def test_public_uri_drops_the_whole_userinfo():
    assert public_uri("postgresql://u:pa/ss@db:5432/m") == "postgresql://db:5432/m"
    assert public_uri("postgresql://u:p@ss@db/m?sslmode=x") == "postgresql://db/m"
    assert public_uri("abfs://box@acct/d") == "abfs://box@acct/d"


def test_tracking_errors_and_the_server_lines_are_redacted(tmp_path):
    from workflows import tracking as t
    from workflows.config import ServerConfig
    from workflows.ops import server

    with pytest.raises(t.TrackingError) as err:
        t.resolve_tracking_uri("file://u:hunter2@nas/mlruns")
    assert "hunter2" not in str(err.value)
    launch = server.plan_server(ServerConfig(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                                             artifacts_destination=str(tmp_path / "a")),
                                environ={})
    assert launch.artifacts == str(tmp_path / "a")
    with pytest.raises(server.ServerError) as err:
        server.plan_server(ServerConfig(backend_store_uri="http://u:p@ss@h:5000"), environ={})
    assert "ss@h" not in str(err.value) and "u:***@h:5000" in str(err.value)
