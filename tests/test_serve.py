"""`bertflow serve` on a real Ray Serve at 127.0.0.1: every task answers as `bertflow
predict` / `bertflow embed` do, concurrent callers share batches, bad requests get their
4xx while the server keeps serving, and moving an alias under a steady request stream
switches the served version without a failed request. The request checks themselves
are pure functions, tested without Ray."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from tests.helpers import TASK_LABELS as LABELS
from tests.helpers import tiny_task_folder
from workflows.config import ServeConfig
from workflows.serving.serve import (HTTPError, RequestLimits, ServeError, check_rows,
                                     check_token, parse_inputs, serve_token)

TOKEN = "s3cret-token"
ROWS = {
    "seq-cls": [{"text": "a fine film"}, {"text": "dull " * 80}, {"text": "ok"}],
    "pair-cls": [{"text_a": "a man sleeps", "text_b": "a person rests"},
                 {"text_a": "rain", "text_b": "the sun is out all day long"}],
    "token-cls": [{"tokens": ["Anna", "lives", "in", "Oslo"]}, {"tokens": "two words"}],
    "qa": [{"question": "where does Anna live?", "context": "Anna lives in Oslo. " * 30},
           {"question": "who?", "context": "Nobody knows."}],
}


def call(url: str, body: object = None, *, raw: bytes | None = None, token: str = TOKEN,
         method: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request; 4xx/5xx are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            return exc.code, json.loads(text)
        except json.JSONDecodeError:
            return exc.code, {"error": text}


def records(df: pd.DataFrame) -> list[dict]:
    return json.loads(json.dumps(df.to_dict(orient="records"), default=lambda v: v.tolist()))


def assert_same_predictions(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float):  # other batch-mates pad differently: float noise
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert got[key] == value, key


# ---------------------------------------------------------------- request checks (no Ray)


def test_request_checks_name_the_row_and_field_and_the_right_status():
    limits = RequestLimits(max_inputs=2, max_text_chars=10, max_body_bytes=200)
    assert parse_inputs(b'{"inputs": [{"text": "a"}]}', limits) == [{"text": "a"}]
    cases = [(b"{not json", 400, "malformed JSON"), (b'[1]', 400, "inputs"),
             (b'{"inputs": 3}', 400, "list"), (b'{"inputs": [{}, {}, {}]}', 413, "at most 2"),
             (b'{"inputs": ["' + b"x" * 300 + b'"]}', 413, "over the limit")]
    for body, status, words in cases:
        with pytest.raises(HTTPError, match=words) as exc:
            parse_inputs(body, limits)
        assert exc.value.status == status
    qa = ("question", "context")
    for rows, words in [([{"question": "why?"}], r"inputs\[0\]: missing field 'context'"),
                        ([{"question": "q", "context": "  "}], "missing field 'context'"),
                        ([{"question": 3, "context": "c"}], "expected a string, got int"),
                        ([{"question": "q", "context": "c" * 11}], "11 characters"),
                        (["text"], "expected an object")]:
        with pytest.raises(HTTPError, match=words) as exc:
            check_rows(rows, qa, 10)
        assert exc.value.status == 422
    assert check_rows([{"tokens": ["a", "b"]}, {"tokens": "c d"}], ("tokens",), 10) == {
        "tokens": [["a", "b"], "c d"]}
    with pytest.raises(HTTPError, match="list of words"):
        check_rows([{"tokens": []}], ("tokens",), 10)


def test_tokens_and_binding_beyond_loopback(monkeypatch):
    import hashlib

    digest = hashlib.sha256(b"t0k").hexdigest()
    check_token("Bearer t0k", digest)
    check_token(None, "")  # no token configured: open (loopback only, see below)
    for header in (None, "Bearer wrong", "Basic t0k", "t0k"):
        with pytest.raises(HTTPError) as exc:
            check_token(header, digest)
        assert exc.value.status == 401
    monkeypatch.delenv("BERTFLOW_SERVE_TOKEN", raising=False)
    assert serve_token(ServeConfig(models=["m"])) == ""
    with pytest.raises(ServeError, match="BERTFLOW_SERVE_TOKEN"):
        serve_token(ServeConfig(models=["m"], host="0.0.0.0"))
    assert serve_token(ServeConfig(models=["m"], host="0.0.0.0", insecure=True)) == ""
    monkeypatch.setenv("BERTFLOW_SERVE_TOKEN", "from-env")
    assert serve_token(ServeConfig(models=["m"], host="10.1.2.3")) == "from-env"
    # `bertflow submit serve` joins the cluster and names the token it passes (no value).
    from workflows.ops.jobs import attach_to_cluster, build_entrypoint, passed_variables

    entry = build_entrypoint("serve", attach_to_cluster("serve", ["models:/clf@champion"]))
    assert entry.endswith("workflows.cli serve models:/clf@champion --address auto"), entry
    assert passed_variables({"env_vars": {"BERTFLOW_SERVE_TOKEN": "x", "OTHER": "y"}}) == [
        "BERTFLOW_SERVE_TOKEN"]


# ---------------------------------------------------------------- real Ray Serve


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """A free port for this module's Serve; Serve is shut down after the module (its HTTP
    options are fixed while it runs)."""
    from ray import serve

    from tests.services import free_ports

    yield free_ports(1)[0]
    serve.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_every_task_answers_as_predict_and_embed_and_bad_requests_get_4xx(
        serve_port, tmp_path, minilm_dir, monkeypatch):
    from workflows.serving.batch import folder_embed_settings
    from workflows.serving.predictor import Predictor
    from workflows.serving.serve import Serving

    folders = {task: tiny_task_folder(tmp_path / task, task, minilm_dir) for task in ROWS}
    monkeypatch.setenv("BERTFLOW_SERVE_TOKEN", TOKEN)
    cfg = ServeConfig(models=[*map(str, folders.values()), str(minilm_dir)], port=serve_port,
                      num_cpus=0.25, max_batch_size=8, batch_wait_ms=100, max_inputs=8,
                      max_text_chars=2000, max_body_bytes=20_000)
    serving = Serving(cfg)
    base = f"http://127.0.0.1:{serve_port}"
    try:
        served = serving.start()
        assert set(served) == {*ROWS, "model"}  # MiniLM's folder is named model

        # Every task: the same fields and values as the Predictor `bertflow predict` runs.
        for task, rows in ROWS.items():
            status, answer = call(f"{base}/{task}/predict", {"inputs": rows})
            assert status == 200, answer
            assert answer["model"] == task and answer["version"] == served[task].version
            expected = Predictor.from_dir(folders[task]).predict(pd.DataFrame(rows))
            assert_same_predictions(answer["predictions"], records(expected))
        # Embeddings as `bertflow embed` writes them: MiniLM's sentence-transformers
        # settings (mean pooling, normalised), in the request's order.
        texts = ["The cat sat on the mat.", "Stocks fell sharply in Tokyo today.", "hi"]
        status, answer = call(f"{base}/model/embed", {"inputs": [{"text": t} for t in texts]})
        assert status == 200 and answer["dim"] == 384
        s = folder_embed_settings(minilm_dir)
        want = Predictor.from_dir(minilm_dir).embed(texts, s.pooling, normalize=s.normalize,
                                                    max_seq_len=s.max_seq_len)
        assert s.normalize and pd.DataFrame(answer["embeddings"]).values == pytest.approx(
            want, abs=1e-5)
        status, info = call(f"{base}/token-cls")
        assert status == 200 and info["task"] == "token-cls"
        assert info["labels"] == LABELS["token-cls"] and info["fields"] == ["tokens"]
        with urllib.request.urlopen(f"{base}/-/healthz") as r:  # the proxy's; no token
            assert r.status == 200

        # Concurrent callers share batches: the replica saw batches of several requests.
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: call(f"{base}/seq-cls/predict",
                                                   {"inputs": [{"text": f"review {i}"}]}),
                                    range(32)))
        assert all(status == 200 for status, _ in answers)
        assert_same_predictions([a["predictions"][0] for _, a in answers], records(
            Predictor.from_dir(folders["seq-cls"]).predict(
                pd.DataFrame({"text": [f"review {i}" for i in range(32)]}))))
        sizes = {int(k): v for k, v in call(f"{base}/seq-cls")[1]["batch_sizes"].items()}
        assert max(sizes) > 1, sizes

        # Every bad request gets its 4xx and a message; the next good request succeeds.
        good = (f"{base}/qa/predict", {"inputs": ROWS["qa"][:1]})
        bad = [
            (dict(raw=b'{"inputs": [', url=f"{base}/qa/predict"), 400, "malformed JSON"),
            (dict(body={"rows": []}, url=f"{base}/qa/predict"), 400, '"inputs"'),
            (dict(body={"inputs": [{"question": "where?"}]}, url=f"{base}/qa/predict"), 422,
             "missing field 'context'"),
            (dict(body={"inputs": [{"text": "x"}] * 9}, url=f"{base}/seq-cls/predict"), 413,
             "at most 8"),
            (dict(body={"inputs": [{"text": "x" * 2001}]}, url=f"{base}/seq-cls/predict"),
             422, "over the limit of 2000"),
            (dict(raw=b'{"inputs": ["' + b"y" * 30_000 + b'"]}', url=f"{base}/qa/predict"),
             413, "over the limit"),
            (dict(body={"inputs": [{"text": 5}]}, url=f"{base}/model/embed"), 422,
             "expected a string"),
            (dict(body=None, url=f"{base}/qa/predict"), 405, "POST"),
            (dict(body={"inputs": []}, url=f"{base}/qa/answer"), 404, "no route"),
            (dict(body={"inputs": ROWS["qa"]}, url=f"{base}/qa/predict", token=""), 401,
             "token"),
            (dict(body={"inputs": ROWS["qa"]}, url=f"{base}/qa/predict", token="nope"), 401,
             "token"),
        ]
        for kwargs, want_status, words in bad:
            url = kwargs.pop("url")
            status, answer = call(url, kwargs.pop("body", None), **kwargs)
            assert status == want_status and words in answer["error"], (url, answer)
            assert call(*good)[0] == 200
    finally:
        serving.stop()


@pytest.mark.slow
@pytest.mark.ray
def test_moving_the_alias_under_steady_traffic_switches_versions_without_a_failure(
        serve_port, tmp_path, minilm_dir, tracking_uri):
    from workflows.ops import hf_import
    from workflows.ops.registry import promote
    from workflows.serving.predictor import Predictor
    from workflows.serving.serve import Serving

    folders = [tiny_task_folder(tmp_path / f"v{seed}", "seq-cls", minilm_dir, seed=seed)
               for seed in (1, 2)]
    for folder in folders:
        hf_import.import_hf(folder, "clf", tracking_uri)
    promote("clf", "1", "champion", tracking_uri)
    serving = Serving(ServeConfig(models=["models:/clf@champion"], port=serve_port,
                                  tracking_uri=tracking_uri, poll_interval=0.5,
                                  batch_wait_ms=20))  # default CPUs: room for the surge
    url = f"http://127.0.0.1:{serve_port}/clf/predict"
    rows = [{"text": "a fine film"}, {"text": "a dull one"}]
    served = serving.start()
    assert served["clf"].version == "1" and served["clf"].followed == "models:/clf@champion"
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(call(url, {"inputs": rows}, token=""))

    clients = [threading.Thread(target=client) for _ in range(3)]
    follower = threading.Thread(target=serving.follow)
    try:
        for t in (*clients, follower):
            t.start()
        deadline = time.monotonic() + 60
        while len(answers) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        promote("clf", "2", "champion", tracking_uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
                a.get("version") == "2" for _, a in answers[-3:]):
            time.sleep(0.5)
        time.sleep(2)  # a few more answers after the switch
    finally:
        stop.set()
        for t in clients:
            t.join()
        serving.stop()
        follower.join()
    failed = [(s, a) for s, a in answers if s != 200]
    assert not failed, failed[:3]
    versions = [a["version"] for _, a in answers]
    assert versions[0] == "1" and versions[-1] == "2", versions
    # Each version answered with its own weights (verified by each new replica on load).
    by_version = {v: Predictor.from_dir(f).predict(pd.DataFrame(rows))
                  for v, f in zip(("1", "2"), folders)}
    for _, answer in (answers[0], answers[-1]):
        assert_same_predictions(answer["predictions"], records(by_version[answer["version"]]))
