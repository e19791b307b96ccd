"""`bertflow serve`: models behind HTTP on Ray Serve, one application per model, with the
same `Predictor` engine as `bertflow predict` / `bertflow embed`.

Routes of a model served as NAME (JSON in and out):
- `POST /NAME/predict` `{"inputs": [ROW, ...]}`, each ROW holding the input fields of the
  model's task (`text`; `text_a`/`text_b`; `tokens`; `question`/`context`), answered with
  `{"model": NAME, "version": V, "predictions": [...]}`: per row the fields of `bertflow
  predict`'s output (`label`, `score`; `tags`; `answer`, `start`, `end`, `score`;
  `embedding` for a model without a task head).
- `POST /NAME/embed` `{"inputs": [{"text": ...}, ...]}` -> `{"model", "version", "dim",
  "embeddings": [[...], ...]}`: the vectors `bertflow embed` writes (the folder's
  sentence-transformers pooling, length and normalisation, else mean pooling).
- `GET /NAME`: name, version, task, labels, limits and this replica's batch sizes.
- `GET /-/healthz` is Ray Serve's proxy: 200 while the proxy serves.

Requests are batched across callers (`@serve.batch`); a batch's rows are one Predictor
call (length-sorted micro-batches, results in the callers' order). Each replica runs its
model on one worker thread with as many torch threads as CPUs it was granted.

Versions are pinned: a `models:/NAME@ALIAS` is resolved on the driver to a version, and
replicas are told `models:/NAME/V`, which each downloads and verifies against the sha256
manifest recorded at registration (`workflows.tracking.resolve_model`, as `predict` does)
before it takes a request. When the alias moves, `Serving.follow()` redeploys the
application with the new version: Ray Serve starts the new replicas (surge 100%), routes
to them once their constructor returned (model loaded and verified), then drains and stops
the old ones; every answer names the version that computed it.

Bad requests get a 4xx with a message and never reach a batch: 400 malformed JSON or
shape, 401 no or wrong token, 404 unknown route, 405 wrong method, 413 body over
`--max-body-bytes` or more than `--max-inputs` rows, 422 a missing or empty field (a
question without a context), a field of the wrong type, a text over `--max-text-chars`.
Texts within that limit are truncated to the model's max_seq_len word pieces, exactly as
`bertflow predict` does (qa contexts are windowed, token-cls sentences chunked).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from bert_core.config_io import BertflowError
from workflows.config import MODEL_NAME, SERVE_TOKEN_ENV, ServeConfig

log = logging.getLogger(__name__)


# Ray Serve's throughput-optimised request path (documented for Ray >= 2.56: "Enable High
# Throughput on Ray Serve"), for the Ray that `bertflow serve` starts itself: proxy ->
# replica over gRPC instead of Ray actor calls, user code and the router on the main event
# loop (the model runs on its own thread anyway), request-path logs buffered, no copy of
# every log line on stderr, the garbage collector frozen after start-up. Measured with
# bench/serve_load.py (docs/benchmarks.md). Direct ingress, which that mode also turns on,
# stays off: it takes the proxy away (requests would go to per-replica ports, which
# HAProxy then fronts on all interfaces); bertflow keeps one port on --host. Variables
# already set win; a cluster joined with --address keeps the settings its nodes started with.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}

# The replicas' environment (their runtime_env, so it holds on a cluster too; a value set
# in bertflow serve's own environment wins). torch's OpenMP threads (libgomp) spin after
# every parallel region before they sleep, and on a replica that computes a batch every few
# milliseconds they spun on the CPUs that Ray Serve's proxy and the replica's request path
# need: sleeping at once measured 100 vs 70 requests/s at 8 clients on 2 cores, 13.0 vs
# 16.4 ms of server CPU per request, p99 104 vs 157 ms (bench/serve_load.py).
REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


class ServeError(BertflowError):
    """`bertflow serve` cannot start as asked; the message says what to change."""


# ---------------------------------------------------------------- what replicas are told


@dataclass(frozen=True)
class ServedModel:
    """One model as its replicas load it: a pinned registered version or a shipped folder."""

    name: str            # the route: /NAME/...
    version: str         # the registered version, or "folder-<sha256[:12]>" for a folder
    ref: str = ""        # models:/NAME/VERSION (pinned), "" for a folder
    folder: Any = None   # workflows.transfer.ShippedFolder of a folder model
    tracking_uri: str | None = None
    followed: str = ""   # the alias reference being followed, e.g. models:/X@champion


@dataclass(frozen=True)
class RequestLimits:
    """What a replica accepts; the token is kept as its sha256 only."""

    max_inputs: int
    max_text_chars: int
    max_body_bytes: int
    token_sha256: str = ""


@dataclass(frozen=True)
class ReplicaSettings:
    micro_batch: int = 32
    max_batch_size: int = 16
    batch_wait_s: float = 0.02
    use_gpu: bool = False
    threads: int = 1     # torch threads: the replica's share of the CPUs


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------- request checks (pure)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_token(authorization: str | None, token_sha256: str) -> None:
    """401 unless the `Authorization: Bearer TOKEN` header carries the served token."""
    if not token_sha256:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_sha256(given.strip()),
                                                             token_sha256):
        raise HTTPError(401, "missing or wrong token: send Authorization: Bearer TOKEN")


def parse_inputs(body: bytes, limits: RequestLimits) -> list[Any]:
    """The `inputs` list of a request body, or an HTTPError saying what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise HTTPError(413, f"request body of {len(body)} bytes is over the limit of "
                             f"{limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise HTTPError(400, 'expected a JSON object {"inputs": [ROW, ...]}')
    inputs = data["inputs"]
    if not isinstance(inputs, list):
        raise HTTPError(400, '"inputs" must be a list of rows')
    if len(inputs) > limits.max_inputs:
        raise HTTPError(413, f"{len(inputs)} inputs in one request; at most "
                             f"{limits.max_inputs} (split the request)")
    return inputs


def check_rows(inputs: list[Any], fields: tuple[str, ...], max_chars: int) -> dict[str, list]:
    """{field: values} of `inputs` (each a JSON object with `fields`), or a 422 naming the
    row and the field. `tokens` may be a list of words or one string of words."""
    columns: dict[str, list] = {f: [] for f in fields}
    for i, row in enumerate(inputs):
        if not isinstance(row, dict):
            raise HTTPError(422, f"inputs[{i}]: expected an object with "
                                 f"{', '.join(fields)}")
        for f in fields:
            value = row.get(f)
            if f == "tokens" and isinstance(value, list):
                if not value or not all(isinstance(w, str) for w in value):
                    raise HTTPError(422, f"inputs[{i}].tokens: give a non-empty list of "
                                         "words (strings)")
                size = sum(len(w) for w in value)
            elif value is None or (isinstance(value, str) and not value.strip()):
                raise HTTPError(422, f"inputs[{i}]: missing field {f!r} (a row needs "
                                     f"{', '.join(fields)})")
            elif not isinstance(value, str):
                raise HTTPError(422, f"inputs[{i}].{f}: expected a string, got "
                                     f"{type(value).__name__}")
            else:
                size = len(value)
            if size > max_chars:
                raise HTTPError(422, f"inputs[{i}].{f}: {size} characters, over the limit of "
                                     f"{max_chars}")
            columns[f].append(value)
    return columns


def json_safe(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON values (floats kept exactly)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy array or scalar
        return json_safe(value.tolist())
    return value


# ---------------------------------------------------------------- the replica


class ModelReplica:
    """A Ray Serve replica of one model: loads and verifies it, then answers the routes.

    The model runs on one worker thread (the replica's CPU pool: torch uses as many
    threads as CPUs were granted), so the replica's event loop keeps accepting, checking
    and batching requests while a batch computes."""

    def __init__(self, model: ServedModel, limits: RequestLimits,
                 settings: ReplicaSettings) -> None:
        from workflows.serving.batch import folder_embed_settings
        from workflows.serving.predictor import Predictor

        self.model, self.limits = model, limits
        device = "cuda" if settings.use_gpu else "cpu"
        with self._model_folder(model) as folder:  # everything is read into memory here
            self.predictor = Predictor.from_dir(folder, device=device,
                                                batch_size=settings.micro_batch,
                                                threads=settings.threads)
            self.embedding = folder_embed_settings(folder)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        for handler in (self.predict_batch, self.embed_batch):
            handler.set_max_batch_size(settings.max_batch_size)
            handler.set_batch_wait_timeout_s(settings.batch_wait_s)
        self.batch_sizes: Counter[int] = Counter()  # requests per batch -> batches
        log.info("replica of %s loaded version %s", model.name, model.version)

    @staticmethod
    @contextlib.contextmanager
    def _model_folder(model: ServedModel) -> Iterator[Path]:
        """The model's folder on this node: a shipped folder materialised, or the pinned
        version downloaded and verified against its manifest (deleted after loading)."""
        from workflows.tracking import resolved_model
        from workflows.transfer import local_folder

        if model.folder is not None:
            yield local_folder(model.folder)
            return
        with resolved_model(model.ref, model.tracking_uri) as folder:
            yield folder

    # ---- batches (run on the model thread) ------------------------------------------
    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def predict_batch(self, requests: list[dict[str, list]]) -> list[list[dict]]:
        import pandas as pd

        self.batch_sizes[len(requests)] += 1
        counts = [len(next(iter(r.values()))) for r in requests]
        df = pd.DataFrame({c: [v for r in requests for v in r[c]] for c in requests[0]})
        out = await self._compute(self.predictor.predict, df)
        rows = json_safe(out.to_dict(orient="records"))
        answers, start = [], 0
        for n in counts:
            answers.append(rows[start:start + n])
            start += n
        return answers

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def embed_batch(self, requests: list[list[str]]) -> list[list[list[float]]]:
        self.batch_sizes[len(requests)] += 1
        texts = [t for r in requests for t in r]
        s = self.embedding
        vecs = await self._compute(lambda: self.predictor.embed(
            texts, pooling=s.pooling, normalize=s.normalize, max_seq_len=s.max_seq_len))
        rows = vecs.astype("float32").tolist()
        answers, start = [], 0
        for r in requests:
            answers.append(rows[start:start + len(r)])
            start += len(r)
        return answers

    # ---- HTTP -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"model": self.model.name, "version": self.model.version, "task": p.task,
                "labels": p.labels, "fields": list(p.inputs),
                "max_seq_len": p.max_seq_len, "follows": self.model.followed or None,
                "embedding": {"pooling": self.embedding.pooling,
                              "normalize": self.embedding.normalize,
                              "max_seq_len": self.embedding.max_seq_len},
                "limits": {"max_inputs": self.limits.max_inputs,
                           "max_text_chars": self.limits.max_text_chars,
                           "max_body_bytes": self.limits.max_body_bytes},
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await self._route(request))
        except HTTPError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def _route(self, request: Any) -> dict[str, Any]:
        check_token(request.headers.get("authorization"), self.limits.token_sha256)
        root = request.scope.get("root_path", "")
        path = request.url.path
        action = (path[len(root):] if root and path.startswith(root) else path).strip("/")
        if action not in ("", "predict", "embed"):
            raise HTTPError(404, f"no route {path}: use GET /{self.model.name}, POST "
                                 f"/{self.model.name}/predict or /{self.model.name}/embed")
        if action == "":
            if request.method != "GET":
                raise HTTPError(405, f"use GET /{self.model.name}")
            return self.info()
        if request.method != "POST":
            raise HTTPError(405, f"use POST {path}")
        inputs = parse_inputs(await self._body(request), self.limits)
        head = {"model": self.model.name, "version": self.model.version}
        if action == "embed":
            texts = check_rows(inputs, ("text",), self.limits.max_text_chars)["text"]
            vectors = await self.embed_batch(texts) if texts else []
            return {**head, "dim": len(vectors[0]) if vectors else 0, "embeddings": vectors}
        columns = check_rows(inputs, self.predictor.inputs,
                             self.limits.max_text_chars)
        return {**head, "predictions": await self.predict_batch(columns) if inputs else []}

    async def _body(self, request: Any) -> bytes:
        """The body, refused (413) as soon as it grows past the limit."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body of {declared} bytes is over the limit of "
                                 f"{limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------- the driver


def serve_token(cfg: ServeConfig) -> str:
    """The bearer token (flag, else $BERTFLOW_SERVE_TOKEN); refusing to bind beyond
    loopback without one unless --insecure."""
    from workflows.ops.jobs import is_loopback

    token = cfg.auth_token or os.environ.get(SERVE_TOKEN_ENV, "")
    if not token and not is_loopback(cfg.host) and not cfg.insecure:
        raise ServeError(f"--host {cfg.host} is reachable beyond this machine: give a token "
                         f"(set {SERVE_TOKEN_ENV}, or --auth-token) or pass --insecure to "
                         "serve without one")
    return token


def model_name_of(ref: str) -> str:
    """The route name: the registered model's name, else the folder's name."""
    from workflows.tracking import parse_model_ref

    parsed = parse_model_ref(ref)
    name = parsed[0] if parsed else Path(ref.rstrip("/")).name
    if not MODEL_NAME.match(name) or name == "-":
        raise ServeError(f"{ref}: {name!r} cannot be a route name; rename the folder "
                         "(letters, digits, '.', '_', '-')")
    return name


class Serving:
    """The applications `bertflow serve` runs, and the alias watch that keeps them on
    their alias's version. `start()`, then `follow()` (blocks) or `check_aliases()`."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.token = serve_token(cfg)
        self.models: dict[str, ServedModel] = {}
        self._stop = threading.Event()
        self._failed: dict[str, str] = {}  # name -> a version that did not start
        self._share = 1.0  # CPUs per replica, set by start()

    # ---- resolving ------------------------------------------------------------------
    def _pin(self, ref: str) -> ServedModel:
        """`ref` resolved to what replicas load: a registered version (its number), or a
        folder shipped through the object store (its digest)."""
        from workflows import tracking as T
        from workflows.transfer import ship_folder

        name = model_name_of(ref)
        parsed = T.parse_model_ref(ref)
        if parsed is None:
            folder = T.resolve_model(ref)
            shipped = ship_folder(folder, origin=ref)
            return ServedModel(name, f"folder-{shipped.digest[:12]}", folder=shipped)
        uri = T.resolve_tracking_uri(self.cfg.tracking_uri)
        mv = T.get_model_version(ref, uri)
        followed = ref if parsed[1] is not None or parsed[2] in (None, "latest") else ""
        return ServedModel(name, str(mv.version), ref=f"models:/{mv.name}/{mv.version}",
                           tracking_uri=uri, followed=followed)

    # ---- deploying ------------------------------------------------------------------
    def _application(self, model: ServedModel) -> Any:
        from data_prep.ray_env import worker_runtime_env

        cfg = self.cfg
        share = self._share
        cpus = share
        if model.followed and cfg.num_cpus is None and not cfg.use_gpu:
            # Half the share is reserved, so the next version's replicas fit beside these
            # while the alias switches (surge); torch still runs on the whole share.
            cpus = share / 2
        actor: dict[str, Any] = {"num_cpus": cpus}
        if cfg.use_gpu:
            actor["num_gpus"] = 1
        runtime_env = worker_runtime_env(
            {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}})
        if runtime_env:
            actor["runtime_env"] = runtime_env
        scaling: dict[str, Any] = {"num_replicas": cfg.min_replicas}
        if cfg.max_replicas > cfg.min_replicas:
            scaling = {"autoscaling_config": {
                "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": max(1, cfg.max_batch_size // 2)}}
        deployment = serve.deployment(
            ModelReplica, name=model.name, ray_actor_options=actor,
            # room for two full batches: one computing, one filling
            max_ongoing_requests=2 * cfg.max_batch_size,
            max_surge_percent=100,  # the new version's replicas start before old ones stop
            graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=60.0,
            **scaling)
        limits = RequestLimits(cfg.max_inputs, cfg.max_text_chars, cfg.max_body_bytes,
                               _sha256(self.token) if self.token else "")
        settings = ReplicaSettings(cfg.micro_batch, cfg.max_batch_size,
                                   cfg.batch_wait_ms / 1000.0, cfg.use_gpu,
                                   threads=max(1, int(share)))
        return deployment.bind(model, limits, settings)

    def _logging(self) -> dict[str, Any]:
        """Ray Serve's logging: one access-log line per request in the proxy and in the
        replica only with --access-log (they cost ~15% of a request's CPU on 2 cores)."""
        return {"enable_access_log": bool(self.cfg.access_log)}

    def deploy(self, model: ServedModel) -> None:
        """Deploy (or update) `model`'s application; returns when it serves that version."""
        serve.run(self._application(model), name=model.name, route_prefix=f"/{model.name}",
                  blocking=False, logging_config=self._logging())
        self.models[model.name] = model
        log.info("serving %s version %s at http://%s:%d/%s", model.name, model.version,
                 self.cfg.host, self.cfg.port, model.name)

    def start(self) -> dict[str, ServedModel]:
        """Start Ray (or join --address) and Serve, and deploy every model."""
        import ray as ray_module

        from data_prep.ray_env import init_ray
        from workflows.serving.batch import replica_cpus

        pinned = []
        if self.cfg.address is None and not ray_module.is_initialized():
            for key, value in THROUGHPUT_ENV.items():  # inherited by the Ray started next
                os.environ.setdefault(key, value)
        ray = init_ray(self.cfg.address)
        # Each replica's CPUs (its torch threads), fixed now: free CPUs shrink as we deploy.
        self._share = (self.cfg.num_cpus or 1.0) if self.cfg.use_gpu else replica_cpus(
            ray, self.cfg.max_replicas * len(self.cfg.models), self.cfg.num_cpus)
        for ref in self.cfg.models:  # resolve all first: a bad reference deploys nothing
            pinned.append(self._pin(ref))
        names = [m.name for m in pinned]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ServeError(f"two models would be served as {', '.join(dupes)}; serve "
                             "models of different names")
        serve.start(http_options={"host": self.cfg.host, "port": self.cfg.port},
                    logging_config=self._logging())
        for model in pinned:
            self.deploy(model)
        return dict(self.models)

    # ---- following aliases ------------------------------------------------------------
    def check_aliases(self) -> list[tuple[str, str, str]]:
        """Redeploy every followed model whose alias moved; [(name, old, new version)]."""
        from workflows import tracking as T

        moved = []
        for name, model in list(self.models.items()):
            if not model.followed:
                continue
            try:
                mv = T.get_model_version(model.followed, model.tracking_uri)
            except BertflowError as exc:  # the registry is down or the alias was removed
                log.warning("%s: cannot check %s (%s); still serving version %s", name,
                            model.followed, exc, model.version)
                continue
            version = str(mv.version)
            if version == model.version or self._failed.get(name) == version:
                continue
            log.info("%s moved from version %s to %s: deploying it", model.followed,
                     model.version, version)
            try:
                self.deploy(ServedModel(name, version, ref=f"models:/{mv.name}/{version}",
                                        tracking_uri=model.tracking_uri,
                                        followed=model.followed))
            except Exception as exc:  # e.g. its files do not verify: replicas never start
                self._failed[name] = version  # not retried until the alias moves again
                log.error("%s version %s did not start (%s); Ray Serve keeps the replicas "
                          "of version %s serving", name, version, exc, model.version)
                continue
            moved.append((name, model.version, version))
        return moved

    def follow(self) -> None:
        """Check the followed aliases every --poll-interval seconds until `stop()`."""
        while not self._stop.wait(self.cfg.poll_interval):
            self.check_aliases()

    def stop(self) -> None:
        """Stop following and delete the applications this Serving deployed."""
        self._stop.set()
        for name in list(self.models):
            try:
                serve.delete(name)
            except Exception as exc:  # Serve already gone (Ray stopped): nothing to delete
                log.debug("deleting %s: %s", name, exc)
            self.models.pop(name, None)
