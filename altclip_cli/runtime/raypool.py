"""`altclip embed ... -o DIR/ --ray`: the dataset's parts handed to a pool of Ray actors.

Ray Data runs `PartWriter`, a callable class, with `map_batches(batch_size=1,
compute=ActorPoolStrategy(size=N))`: each actor loads the model once (on its first part) and
embeds whole parts, decoding in its own threads as a local run does, and writes each part with
outputs.dataset.write_part, the code of `--shard`, so the layout, the atomicity and --resume are
the same. Ray carries only part numbers and small summaries: it keeps no row order and writes
no file. An actor that dies is restarted and its part redone by Ray (Ray Data's actor pools
retry by default); the part it left half-written stays in its own staging folder, which the
next actor on that machine removes. DIR must be on storage every node sees.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from ..errors import AltclipError

_COUNTS = ("part", "inputs", "rows", "failed")
MANIFEST_ONLY = -1  # a "part" that only creates the manifest (an empty input list)


class PartWriter:
    """A Ray Data actor: `__call__({"part": [p]})` writes part p and returns its summary."""

    def __init__(self, *, config: dict, inputs: list):
        self.config = config
        self._inputs_ref = inputs  # [ObjectRef]: fetched with the model, on the first part
        self._ready = False

    def _setup(self) -> None:
        import ray

        from ..outputs import dataset as ds
        from .altclip import load
        from .device import default_batch_size
        from .rows import TEXT_CHUNK

        c = self.config
        self.inputs = ray.get(self._inputs_ref[0])
        names = self.inputs if c["kind"] == "text" else [s.name for s in self.inputs]
        self.model = load(c["model_path"], device=c["device"], precision=c["precision"], revision=c["revision"],
                          exact_decode=c["exact_decode"], progress=False)
        span = c["batch_size"] or (TEXT_CHUNK if c["kind"] == "text" else default_batch_size(self.model.device, "image"))
        ds.check_part_size(c["part_size"], span, c["kind"])

        run = SimpleNamespace(kind=c["kind"], model_name=c["model"], normalize=c["normalize"],
                              exact_decode=c["exact_decode"])
        manifest = ds.make_manifest(settings=ds.settings_for(run, self.model, c["dtype"]),
                                    dim=self.model.embed_dim, names=names, part_size=c["part_size"], extra=c["extra"])
        self.manifest = ds.ensure_manifest(Path(c["folder"]), manifest, resume=c["resume"])
        ds.remove_stale_staging(Path(c["folder"]))
        self._ready = True

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        parts = [int(p) for p in batch["part"]]
        try:
            if not self._ready:
                self._setup()
            results = [self._write(p) for p in parts]
        except AltclipError as exc:  # handed back as data: Ray's wrappers lose the exception's class
            import json

            error = json.dumps({"message": exc.message, "hint": exc.hint})
            results = [{"part": p, "inputs": 0, "rows": 0, "failed": 0, "failures": "[]", "error": error}
                       for p in parts]
        return {key: np.array([r.get(key, "") for r in results], dtype=np.int64 if key in _COUNTS else object)
                for key in ("part", "inputs", "rows", "failed", "failures", "error")}

    def _write(self, part: int) -> dict:
        import json

        from ..outputs import dataset as ds
        from . import rows

        c = self.config
        if part == MANIFEST_ONLY:
            return {"part": part, "inputs": 0, "rows": 0, "failed": 0, "failures": "[]"}
        start, stop = ds.part_range(self.manifest, part)
        chunk = self.inputs[start:stop]
        if c["kind"] == "text":
            batches = rows.text_batches(self.model, chunk, batch_size=c["batch_size"], normalize=c["normalize"])
        else:
            batches = rows.image_batches(self.model, chunk, batch_size=c["batch_size"], normalize=c["normalize"],
                                         open_kw=c["open_kw"], input_timeout=c["input_timeout"],
                                         workers=c["decode_workers"])
        with _pixel_limit(c["max_pixels"]):
            result = ds.write_part(Path(c["folder"]), self.manifest, part, batches, extra=c["extra"])
        return {"part": part, "inputs": result.inputs, "rows": result.rows, "failed": result.failed,
                "failures": json.dumps(result.failures, ensure_ascii=False)}


def _pixel_limit(max_pixels):
    from ..inputs.images import pil_pixel_limit

    return pil_pixel_limit(max_pixels)


def _import_ray():
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # Ray's C++ warnings, not ours to act on
    try:
        import ray
        import ray.data  # noqa: F401 - ray without its data extra lacks it
    except ImportError:
        raise AltclipError("--ray needs Ray (with Ray Data), which is not installed",
                           hint="pip install 'altclip[ray]'") from None
    return ray


def _connect(ray, address: str, msgs) -> bool:
    """Connect to the cluster (True when this run started a local Ray it must shut down)."""
    if ray.is_initialized():  # an embedding program's own connection (or the tests')
        return False
    try:
        if address == "auto":  # $RAY_ADDRESS (ray.init reads it), else a local Ray for the run
            started = not os.environ.get("RAY_ADDRESS")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            started = False
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise AltclipError(f"cannot connect to the Ray cluster at {address} ({exc})",
                           hint="start it with `ray start --head`, or give its address: --ray=HOST:6379") from None
    msgs.note("Ray: started a local Ray for this run" if started else "Ray: connected to the cluster")
    return started


def _resources(ray, options) -> tuple[int, float, float]:
    """(actors, GPUs each, CPUs each): GPUs when the cluster has them, one actor per GPU."""
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    per_cpu = options.cpus_per_worker if options.cpus_per_worker is not None else 1.0
    workers = options.workers or (max(1, int(gpus // per_gpu)) if per_gpu else 1)
    return workers, per_gpu, per_cpu


def _check_fits(ray, workers: int, per_gpu: float, per_cpu: float, msgs) -> None:
    """A pool the cluster cannot hold would wait for ever: none of the GPUs asked for is an error,
    too few CPUs or GPUs (an autoscaling cluster may add them) a warning."""
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 0)
    if per_gpu and not gpus:
        raise AltclipError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has no GPUs",
                           hint="leave out --gpus-per-worker (or give 0) to embed on the CPUs")
    if workers * per_gpu > gpus or workers * per_cpu > cpus:
        msgs.warn(f"Ray: {workers} actors of {per_gpu:g} GPU and {per_cpu:g} CPU need more than the cluster has now "
                  f"({gpus:g} GPUs, {cpus:g} CPUs): the run may wait until it has them")


def _cause(exc: BaseException) -> AltclipError | None:
    """The AltclipError an actor raised, out of Ray's wrappers."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AltclipError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def fill(run, inputs, names, folder: Path, *, dtype: str, resume: bool, part_size: int, options, opener_kw):
    """Fill the dataset at `folder` with Ray actors; the run's summary (outputs.dataset.Summary)."""
    import json

    from ..version import __version__
    from ..outputs import dataset as ds

    msgs = run.msgs
    folder = Path(folder).resolve()  # the actors' working folder is not ours
    existing = ds.read_manifest(folder) if folder.is_dir() else None
    if run.batch_size or run.kind == "text":  # the batch is known here; else the actors check it
        from .rows import TEXT_CHUNK

        ds.check_part_size(part_size, run.batch_size or TEXT_CHUNK, run.kind)
    plan = {"inputs": len(names), "inputs_sha256": ds.inputs_digest(names), "part_size": part_size}
    if existing is not None:  # what needs no model is checked here; the actors check the rest
        ds.compare_manifests(folder, existing, {**existing, **plan}, resume=resume)
    parts = -(-len(names) // part_size)
    todo = list(range(parts))
    if resume and existing is not None:
        todo = ds.missing_parts(folder, existing, todo)
    if not todo and existing is None:
        todo = [MANIFEST_ONLY]
    if not todo:  # --resume of a complete dataset: nothing to do, so Ray is neither imported nor started
        msgs.note(f"{folder}: every part is already complete: nothing to do")
        summary = ds.Summary(existing, list(range(existing["parts"])))
        summary.add_done(folder, summary.ours)
        return summary
    ray = _import_ray()
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start and finish lines: the notes say it
    started = _connect(ray, run_address(options), msgs)
    try:
        workers, per_gpu, per_cpu = _resources(ray, options)
        _check_fits(ray, workers, per_gpu, per_cpu, msgs)
        msgs.note(f"Ray: {len(todo)} part{'' if len(todo) == 1 else 's'} for {workers} actor"
                  f"{'' if workers == 1 else 's'} ({per_gpu:g} GPU, {per_cpu:g} CPU each)")
        config = {"kind": run.kind, "model": run.model_name, "model_path": _absolute(run.model_name),
                  "device": run.device, "precision": run.precision,
                  "revision": run.revision, "exact_decode": run.exact_decode, "batch_size": run.batch_size,
                  "normalize": run.normalize, "dtype": dtype, "part_size": part_size, "folder": str(folder),
                  "resume": resume, "open_kw": opener_kw, "input_timeout": run.input_timeout,
                  "max_pixels": run.max_pixels, "extra": {"model": run.model_name, "altclip": __version__},
                  "decode_workers": max(1, int(per_cpu)) if per_gpu else None}
        results = _run(ray, todo, config, inputs, workers, per_gpu, per_cpu)
        manifest = None
        summary = None
        total = sum(b - a for a, b in ((p * part_size, min((p + 1) * part_size, len(names))) for p in todo if p >= 0))
        with msgs.progress("embedding", total=total) as bar:
            for row in results:
                if row["error"]:
                    error = json.loads(row["error"])
                    raise AltclipError(error["message"], hint=error["hint"])
                if manifest is None:
                    manifest = ds.read_manifest(folder)
                    summary = ds.Summary(manifest, list(range(manifest["parts"])))
                    pending = set(todo)
                    summary.add_done(folder, [p for p in summary.ours if p not in pending])
                if int(row["part"]) == MANIFEST_ONLY:
                    continue
                for name, why in json.loads(row["failures"]):
                    msgs.error(f"{name}: {why}")
                summary.add(SimpleNamespace(inputs=int(row["inputs"]), rows=int(row["rows"]), failed=int(row["failed"])))
                bar.advance(int(row["inputs"]))
    except (KeyboardInterrupt, AltclipError):
        raise
    except Exception as exc:
        cause = _cause(exc)
        if cause is not None:
            raise cause from None
        raise AltclipError(f"the Ray run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           hint="run again with --debug for Ray's traceback; --resume keeps the parts done") from exc
    finally:
        if started:
            ray.shutdown()
        ds.remove_stale_staging(folder)  # of actors killed on this machine (the others' remove theirs)
    return summary


def _absolute(path: str) -> str:
    """A local folder's absolute path (the actors' working folder is not ours); a hub id as is."""
    return os.path.abspath(path) if os.path.isdir(path) else path


def _absolute_source(source):
    """The Source with an absolute path to read and its name as given (the records name it so)."""
    from dataclasses import replace

    return replace(source, path=os.path.abspath(source.path)) if source.path is not None else source


def run_address(options) -> str:
    return options.ray or "auto"


def _run(ray, todo, config, inputs, workers, per_gpu, per_cpu):
    """Ray Data's pipeline over the part numbers: an iterator of summaries as parts finish."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    inputs_ref = ray.put(inputs if config["kind"] == "text" else [_absolute_source(s) for s in inputs])
    items = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
    written = items.map_batches(PartWriter, fn_constructor_kwargs={"config": config, "inputs": [inputs_ref]},
                                batch_size=1, batch_format="numpy", num_cpus=per_cpu, num_gpus=per_gpu,
                                compute=ActorPoolStrategy(size=workers))
    return written.iter_rows()
