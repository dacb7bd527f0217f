"""`altclip embed ... -o DIR/`: a dataset of parts (outputs/dataset.py), filled by this process,
by one task of a job array (--shard I/N), or by a pool of Ray actors (--ray, runtime/raypool.py).
Every way writes each part with the same code, so layout, atomicity and --resume are the same."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from ...outputs.dataset import Summary, settings_for
from ..options import UsageError


@dataclass(frozen=True)
class DatasetOptions:
    part_size: int | None = None
    shard: tuple[int, int] | None = None
    ray: str | None = None  # "auto": RAY_ADDRESS, else a local Ray for the run
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None

    def given(self) -> list[str]:
        """The options given, as the command line names them."""
        names = {"part_size": "--part-size", "shard": "--shard", "ray": "--ray", "workers": "--workers",
                 "gpus_per_worker": "--gpus-per-worker", "cpus_per_worker": "--cpus-per-worker"}
        return [option for key, option in names.items() if getattr(self, key) is not None]


class ShardType(click.ParamType):
    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            index, count = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N (e.g. 0/4 for the first of 4 tasks)", param, ctx)
        if count < 1 or not 0 <= index < count:
            self.fail(f"{value!r}: I must be 0 to N-1 (e.g. $SLURM_ARRAY_TASK_ID/4 with --array=0-3)", param, ctx)
        return index, count


def dataset_options(f):
    """The options of a dataset output, handed to the command as one `dataset` argument."""
    options = [
        click.option("--part-size", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With -o DIR/: inputs per part [default: 102400, or the existing dataset's]; "
                          "a multiple of the batch."),
        click.option("--shard", type=ShardType(), default=None, metavar="I/N",
                     help="With -o DIR/: do only the parts whose number is I mod N (one task of a job array; "
                          "every task gives the same inputs)."),
        click.option("--ray", "ray", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
                     help="With -o DIR/: fill the dataset with a pool of Ray actors on the cluster at ADDRESS "
                          "[default: $RAY_ADDRESS, else a local Ray for the run]; needs altclip[ray]. Put it "
                          "last, or write --ray=ADDRESS."),
        click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With --ray: actors, each with its own model [default: 1, or one per GPU]."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None, metavar="G",
                     help="With --ray: GPUs each actor reserves [default: 1 on a cluster with GPUs, else 0]."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0), default=None, metavar="C",
                     help="With --ray: CPUs each actor reserves (its decoding threads) [default: 1]."),
    ]

    @functools.wraps(f)
    def command(*args, part_size, shard, ray, workers, gpus_per_worker, cpus_per_worker, **kwargs):
        return f(*args, dataset=DatasetOptions(part_size, shard, ray, workers, gpus_per_worker, cpus_per_worker),
                 **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def check_usage(dataset: DatasetOptions, *, to_dataset: bool, server: str, index_dir) -> None:
    """Dataset options without a dataset, and combinations that cannot work: UsageError."""
    given = dataset.given()
    if given and not to_dataset:
        raise UsageError(f"{given[0]} needs -o DIR/ (a dataset folder)",
                         hint="end -o with a slash, e.g. -o vectors/, to write a dataset of parts")
    ray_only = [o for o in given if o in ("--workers", "--gpus-per-worker", "--cpus-per-worker")]
    if ray_only and dataset.ray is None:
        raise UsageError(f"{ray_only[0]} needs --ray")
    if dataset.ray is not None and dataset.shard is not None:
        raise UsageError("give either --ray or --shard, not both",
                         hint="Ray hands the parts out itself; --shard is for job arrays without it")
    if dataset.ray is not None and server not in ("auto", "off"):
        raise UsageError("--server is not used with --ray", hint="each Ray actor loads its own model")
    if dataset.ray is not None and index_dir is not None:
        raise UsageError("--index is not used with --ray")


def batch_span(run) -> int:
    """Inputs per batch of rows.text_batches / image_batches for this run."""
    if run.kind == "text":
        from ...runtime.rows import TEXT_CHUNK

        return run.batch_size or TEXT_CHUNK
    return run.batch_size or run.model.default_batch_size("image")


def to_dataset(run, inputs, names, output, dtype, resume, dataset: DatasetOptions, opener_kw) -> None:
    """Fill the dataset at `output` (this process's parts); exits 3 when inputs failed."""
    from ...version import __version__
    from ...outputs import dataset as ds

    msgs = run.msgs
    folder = ds.check_folder(output)
    existing = ds.read_manifest(folder) if folder.is_dir() else None
    part_size = dataset.part_size or (existing or {}).get("part_size") or ds.DEFAULT_PART_SIZE
    if dataset.ray is not None:
        from ...runtime import raypool

        summary = raypool.fill(run, inputs, names, folder, dtype=dtype, resume=resume, part_size=part_size,
                               options=dataset, opener_kw=opener_kw)
        _finish(run, folder, summary)
        return
    try:
        model = run.model
    except KeyboardInterrupt:
        msgs.error(f"interrupted; nothing was written to {folder}")
        click.get_current_context().exit(_exit_status().INTERRUPTED)
    ds.check_part_size(part_size, batch_span(run), run.kind)
    manifest = ds.make_manifest(settings=settings_for(run, model, dtype), dim=model.embed_dim, names=names,
                                part_size=part_size, extra={"model": run.model_name, "altclip": __version__})
    manifest = ds.ensure_manifest(folder, manifest, resume=resume)
    ds.remove_stale_staging(folder)
    ours = ds.shard_parts(manifest["parts"], dataset.shard)
    todo = ds.missing_parts(folder, manifest, ours) if resume else ours
    summary = Summary(manifest, ours)
    pending = set(todo)
    summary.add_done(folder, [p for p in ours if p not in pending])
    if resume and summary.parts_done:
        msgs.note(f"resuming: {summary.parts_done} of {len(ours)} parts are already complete")
    total = sum(b - a for a, b in (ds.part_range(manifest, p) for p in todo))
    from ...outputs.signals import sigterm_as_interrupt

    with sigterm_as_interrupt() as terminated:
        try:
            with msgs.progress("embedding", total=total) as bar:
                for part in todo:
                    start, stop = ds.part_range(manifest, part)
                    batches = _advancing(run.batches(inputs[start:stop], opener_kw), bar)
                    summary.add(ds.write_part(folder, manifest, part, batches,
                                              extra={"model": run.model_name, "altclip": __version__}))
        except KeyboardInterrupt:
            ds.clear_staging(folder)
            status = _exit_status()
            msgs.error(f"interrupted after {summary.parts_done} of {len(ours)} parts; {folder} keeps the parts done",
                       hint="run the same command with --resume to do the rest")
            click.get_current_context().exit(status.TERMINATED if terminated.received else status.INTERRUPTED)
        finally:
            ds.clear_staging(folder)
    _finish(run, folder, summary)


def _finish(run, folder, summary: Summary) -> None:
    from ...outputs import dataset as ds

    msgs = run.msgs
    m = summary.manifest
    msgs.note(f"wrote {summary.written} part{'' if summary.written == 1 else 's'} to {folder} "
              f"({summary.parts_done} of {len(summary.ours)} parts of this run complete, {summary.rows} rows)")
    missing = ds.missing_parts(folder, m)
    if not missing:
        msgs.note(f"{folder} is complete ({m['parts']} parts, {m['inputs']} inputs): "
                  f"altclip merge {folder} -o all.npy joins them into one file")
    else:
        msgs.note(f"{len(missing)} of {m['parts']} parts are not done yet (other tasks': {ds.name_parts(missing)})")
    if summary.failed:
        msgs.warn(f"{summary.failed} of {summary.inputs} inputs failed")
        click.get_current_context().exit(_exit_status().PARTIAL)


def _advancing(batches, bar):
    for batch in batches:
        yield batch
        bar.advance(len(batch))


def _exit_status():
    from ..status import ExitStatus

    return ExitStatus
