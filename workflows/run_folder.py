"""A training run's folder, and the model folders found in what users point at, read
without torch and without any training code.

The names of the files in a run folder, the result a finished run leaves there, and the
rules for which checkpoints are trusted live here, because both sides need them: training
writes them (workflows.training.engine, .checkpoint) and inference reads them
(`find_model_folder` behind `bertflow predict`/`embed`, via workflows.tracking). Nothing
here imports torch, Ray, MLflow, workflows.training or anything that imports this module.

Layout of `<storage_path or ./runs>/<run name>/` (a local folder or any pyarrow.fs URI):

    checkpoint_<step:08d>/         Ray Train checkpoints (the latest `keep_checkpoints`)
        model/                     the task's model folder (safetensors, config, tokenizer)
        trainer_state.pt/.json     optimizer, scheduler, scaler, step, data position
        rank_<r>.pt                each worker's RNG state and data position
        bertflow_checkpoint.json   written last by rank 0: every file it wrote, with its size
    checkpoint_manager_snapshot.json   Ray Train's record of the committed checkpoints
    bertflow_result.json           written once the run completed (`TrainResult`)
    tracker_outbox/segment_<n>.jsonl   metrics the tracker has not taken yet, in order
                                   (workflows.tracking_outbox; deleted once delivered)
    bertflow_registration.json     written when the tracker was unreachable at the end:
                                   what `bertflow registry register` needs (deleted then)
    workers/rank<r>.pid            local run folders only: which processes train it

Trusted checkpoints (`trusted_checkpoints`, `latest_checkpoint`): those Ray Train
committed (listed in its snapshot) and those whose completion marker lists files that are
all there at their size. A half-written `checkpoint_*` folder, or one dropped in by hand,
is neither.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from data_prep.storage import Location, LocationError, credential_env, is_local, open_location

RESULT_FILE = "bertflow_result.json"  # written in the run folder when a run completes
COMPLETE_FILE = "bertflow_checkpoint.json"  # a checkpoint's completion marker
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's committed checkpoints
OUTBOX_DIR = "tracker_outbox"  # metrics on their way to the tracker (tracking_outbox)
PENDING_REGISTRATION = "bertflow_registration.json"  # a registration left for later
# The model folder's name inside a checkpoint, and its artifact key in the MLflow pyfunc
# (workflows.tracking.log_bert_model writes it, workflows/serving/pyfunc.py reads it).
MODEL_ARTIFACT = "model"

Where = Any  # a local path (str | Path), a URI, or a data_prep.storage.Location


@dataclass
class TrainResult:
    """What a finished training run leaves (returned by `run_training`, saved in the run
    folder). The folders are Paths for local storage and URIs for remote storage
    (`transfer.local_model_dir` gives a local copy of the model folder)."""

    run_name: str
    run_dir: Path | str
    checkpoint_dir: Path | str      # the final checkpoint
    model_dir: Path | str           # its HF-format model folder
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics of rank 0
    start_step: int = 0             # step the last worker group started from (>0: resumed)
    attempt: int = 0                # how many times the run was (re)started before


@dataclass(frozen=True)
class RunFolder:
    """One run's folder, resolved once: where it is (`uri`: an absolute local path or
    scheme://bucket/key), how Ray Train names it (`ray_storage`), the result of a finished
    run and its latest trusted checkpoint. Picklable (it holds strings only), so it is
    what the driver hands the workers."""

    storage_path: str | None  # as the user gave it (None: ./runs)
    name: str
    uri: str

    @classmethod
    def of(cls, storage_path: str | Path | None, run_name: str) -> RunFolder:
        """The folder of run `run_name` under `storage_path` (default ./runs); a location
        pyarrow cannot resolve is a LocationError naming --storage-path."""
        try:
            root = open_location(storage_path or Path.cwd() / "runs")
        except LocationError as exc:
            raise LocationError(f"--storage-path: {exc}") from None
        uri = root.join(run_name).uri
        return cls(str(storage_path) if storage_path else None, run_name,
                   str(Path(uri).resolve()) if root.local else uri)

    @classmethod
    def at(cls, where: str | Path) -> RunFolder:
        """The run folder at `where` (a path or URI, as results and messages print it)."""
        loc = open_location(where)
        parent = loc.uri.rstrip("/").rsplit("/", 1)[0] if not loc.local else str(Path(loc.uri).parent)
        return cls(parent, loc.name, str(Path(loc.uri).resolve()) if loc.local else loc.uri)

    @cached_property
    def location(self) -> Location:
        return open_location(self.uri)

    @property
    def local(self) -> bool:
        return is_local(self.uri)

    @property
    def where(self) -> Path | str:
        """The folder as results name it: a Path when local, else the URI."""
        return Path(self.uri) if self.local else self.uri

    def join(self, *parts: str) -> Location:
        return self.location.join(*parts)

    def where_of(self, loc: Location) -> Path | str:
        """A location inside this folder in the form results use (Path or URI)."""
        return Path(loc.path) if self.local else loc.uri

    def ray_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig. Local: the parent
        folder, None. A URI: the filesystem resolved here, on the driver, and the path in it.

        Ray Train's controller (which writes the checkpoint snapshot) runs with the job's
        runtime environment only; on a Ray started without the store's variables it could
        not resolve the URI itself. The resolved filesystem carries the endpoint and region,
        and for S3 the driver's keys when they come from AWS_ACCESS_KEY_ID /
        AWS_SECRET_ACCESS_KEY (inside Ray's pickled arguments, never in a log)."""
        import pyarrow.fs as pafs

        if self.local:
            return str(Path(self.uri).parent), None
        fs, path = pafs.FileSystem.from_uri(str(self.storage_path).rstrip("/"))
        env = credential_env()
        if isinstance(fs, pafs.S3FileSystem) and env.get("AWS_ACCESS_KEY_ID") \
                and env.get("AWS_SECRET_ACCESS_KEY"):
            options = dict(fs.__reduce__()[1][0])
            options.update(access_key=env["AWS_ACCESS_KEY_ID"],
                           secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           session_token=env.get("AWS_SESSION_TOKEN"),
                           region=fs.region or env.get("AWS_REGION")
                           or env.get("AWS_DEFAULT_REGION"))
            fs = pafs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})
        return path.rstrip("/"), fs

    def result(self) -> TrainResult | None:
        """The result of the run if it already finished, else None (never trained, or
        stopped before its end: rerunning resumes it)."""
        try:
            saved = json.loads(self.join(RESULT_FILE).read_text())
        except (FileNotFoundError, OSError, ValueError):
            return None
        result = TrainResult(**{f.name: saved[f.name] for f in dataclasses.fields(TrainResult)})
        for name in ("run_dir", "checkpoint_dir", "model_dir"):
            value = getattr(result, name)
            if is_local(value):
                setattr(result, name, Path(value))
        return result

    def write_result(self, text: str) -> None:
        """Save the result file whole: a reader sees all of it or none."""
        if self.local:  # written to a unique temporary name, then renamed
            fd, tmp = tempfile.mkstemp(dir=self.uri, prefix=f".{RESULT_FILE}.")
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            Path(tmp).replace(Path(self.uri) / RESULT_FILE)
        else:  # one PUT: an object store shows all of it or nothing
            self.join(RESULT_FILE).write_text(text)

    def latest_checkpoint(self) -> Path | str | None:
        return latest_checkpoint(self.where)


# ---------------------------------------------------------------- checkpoints


def _loc(where: Where) -> Location:
    return where if isinstance(where, Location) else open_location(where)


def _same_kind(loc: Location, like: Where) -> Any:
    """`loc` as the caller's kind of location: a Path for a local one, else its URI (or
    the Location itself when one was given)."""
    if isinstance(like, Location):
        return loc
    return Path(loc.path) if is_local(loc.uri) else loc.uri


def is_complete(ckpt: Where) -> bool:
    """Whether the completion marker of `ckpt` is there and every file it lists is too,
    at the size it was written with (on any pyarrow filesystem)."""
    import pyarrow.fs as pafs

    try:
        loc = _loc(ckpt)
        files = json.loads(loc.join(COMPLETE_FILE).read_text())["files"]
        if not files:
            return False
        infos = loc.fs.get_file_info([loc.join(rel).path for rel in files])
        return all(i.type == pafs.FileType.File and i.size == size
                   for i, size in zip(infos, files.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def committed_by_ray(run_dir: Where) -> set[str]:
    """Names of the checkpoints Ray Train recorded as reported by every worker."""
    try:
        snapshot = json.loads(_loc(run_dir).join(RAY_SNAPSHOT).read_text())
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _checkpoint_dirs(run: Location) -> list[Location]:
    import pyarrow.fs as pafs

    try:
        infos = run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True))
    except OSError:
        return []
    return [run.join(i.base_name) for i in sorted(infos, key=lambda i: i.base_name)
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]


def trusted_checkpoints(run_dir: Where) -> list[Any]:
    """The checkpoint folders of a run that Ray committed or that are complete (Paths for
    a local run folder, URIs for a remote one, Locations when given a Location)."""
    run = _loc(run_dir)
    committed = committed_by_ray(run)
    return [_same_kind(c, run_dir) for c in _checkpoint_dirs(run)
            if c.path.rsplit("/", 1)[-1] in committed or is_complete(c)]


def checkpoint_step(ckpt: Where) -> int:
    """The step of a checkpoint (its trainer_state.json, else the digits of its name)."""
    loc = _loc(ckpt)
    try:
        return int(json.loads(loc.join("trainer_state.json").read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        digits = re.findall(r"\d+", loc.path.rsplit("/", 1)[-1])
        return int(digits[-1]) if digits else -1


def latest_checkpoint(run_dir: Where) -> Any:
    """The trusted checkpoint with the highest step under a Ray Train run folder (a Path
    for a local run folder, a URI for a remote one), or None."""
    ckpts = [c for c in trusted_checkpoints(run_dir)
             if _loc(c).join(MODEL_ARTIFACT).is_dir()]
    return max(ckpts, key=checkpoint_step) if ckpts else None


# ---------------------------------------------------------------- model folders


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def find_model_folder(path: Path) -> Path | None:
    """The model folder inside a local path: the folder itself, a bertflow checkpoint
    (`model/`), a Ray Train run folder (its latest trusted checkpoint) or a downloaded
    MLflow model (`artifacts/model/`)."""
    if is_model_folder(path):
        return path
    for sub in (path / MODEL_ARTIFACT, path / "artifacts" / MODEL_ARTIFACT):
        if is_model_folder(sub):
            return sub
    ckpt = latest_checkpoint(path)
    if ckpt is not None and is_model_folder(ckpt / MODEL_ARTIFACT):
        return ckpt / MODEL_ARTIFACT
    return None
