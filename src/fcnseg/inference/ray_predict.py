"""Batch prediction on Ray Data: the same files as ``fcnseg predict``, written by a pool of actors, plus a manifest.

    inputs -> Ray Data rows (source, stem) -> actor pool, one ``Segmenter`` per actor (loaded once; read,
    decode, segment, write) -> rows of results -> OUT/manifest.jsonl (appended as they come) -> OUT/manifest.parquet

Ray Data retries a batch whose actor died (its actor pools restart actors and retry tasks by default), so a
batch may be processed twice: outputs are written through ``outputs.write_group`` with ``keep_identical``,
which accepts a file already holding exactly the bytes it would write and refuses any other. The journal
(manifest.jsonl) is appended and flushed per batch because a dying raylet ends the driver without an exception;
``resume`` reads it back. Ray is imported only here and only when a job runs (``pip install 'fcnseg[ray]'``).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..errors import FcnsegError, OutputExistsError, OutputWriteError, show_path
from ..files import atomic_write
from .visualize import PredictionFiles, legend

logger = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
JOURNAL = "manifest.jsonl"
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
STATUSES = ("ok", "failed", "skipped")
NO_RAY = "--engine ray needs Ray Data: pip install 'fcnseg[ray]'"
TOKEN_HINT = ("a Ray 2.60 cluster with token authentication also needs RAY_AUTH_MODE=token and the cluster's "
              "token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")


@dataclass(frozen=True)
class RayJob:
    """What one ``predict --engine ray`` run does; built by the CLI from checked arguments."""

    checkpoint: str
    out: Path
    files: PredictionFiles
    segmenter_options: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    overwrite: bool = False
    resume: bool = False
    address: str | None = None  # None: an embedded local Ray, shut down at the end
    num_workers: int = 1
    worker_threads: int | None = None  # torch threads per actor; None: the CPUs divided among the actors
    batch_size: int = 4  # images per actor call: the unit Ray retries


@dataclass
class RayOutcome:
    """Counts of one job (its rows are in the manifest, never all held in memory)."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    done_before: int = 0  # --resume: inputs recorded ok earlier, their files all there
    seconds: float = 0.0

    def count(self, row: dict[str, Any], before: bool = False) -> None:
        """Count one row: carried over by --resume (``before``), or by its status."""
        if before:
            self.done_before += 1
        elif row["status"] == "ok":
            self.written += 1
        elif row["status"] == "skipped":
            self.skipped += 1
        else:
            self.failed += 1


# -- inputs -------------------------------------------------------------------------------------------

def is_manifest(pattern: str) -> bool:
    """A text, CSV or Parquet file that lists the paths to segment (rather than an image)."""
    return Path(pattern).suffix.lower() in MANIFEST_SUFFIXES and Path(pattern).is_file()


def read_path_list(path: str | os.PathLike) -> list[str]:
    """The paths a manifest lists: a .txt file one per line (blank lines and ``#`` comments skipped), a .csv or
    .parquet file its ``path`` (or ``source``) column, else its first column. Relative paths are taken from the
    manifest's folder. One-line ``FcnsegError`` for a file that cannot be read as such."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".txt":
            items = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            items = [i for i in items if i and not i.startswith("#")]
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                table = list(csv.reader(f))
            if not table:
                raise FcnsegError(f"{show_path(path)}: empty CSV manifest; give a 'path' column")
            header = [h.strip().lower() for h in table[0]]
            col = next((header.index(n) for n in ("path", "source") if n in header), None)
            rows = table[1:] if col is not None else table
            items = [r[col or 0].strip() for r in rows if r and r[col or 0].strip()]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            names = [n.lower() for n in table.column_names]
            col = next((names.index(n) for n in ("path", "source") if n in names), 0)
            items = [str(v) for v in table.column(col).to_pylist() if v]
    except FcnsegError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise FcnsegError(f"{show_path(path)}: cannot read it as a list of paths ({str(e).splitlines()[0]})") from None
    except ImportError:
        raise FcnsegError(f"{show_path(path)}: reading a Parquet manifest needs pyarrow: pip install 'fcnseg[ray]'") \
            from None
    if not items:
        raise FcnsegError(f"{show_path(path)}: manifest lists no paths")
    return [i if os.path.isabs(i) else str(path.parent / i) for i in items]


def expand_manifests(patterns: Sequence[str]) -> list[str]:
    """``patterns`` with every manifest file replaced by the paths it lists (in order)."""
    out: list[str] = []
    for p in patterns:
        out += read_path_list(p) if is_manifest(p) else [p]
    return out


# -- the actor -----------------------------------------------------------------------------------------

class _Predictor:
    """One Ray actor: loads the Segmenter once, then reads, segments and writes the images of each batch."""

    def __init__(self, job: RayJob, threads: int) -> None:
        import torch

        from .segmenter import Segmenter

        # an actor is a process of this job's own, so its process-wide settings are the job's to make, as
        # ``fcnseg predict`` makes them at its entry point: subnormal floats flushed to zero (the same numbers
        # as plain predict, and no slow path where activations underflow), set before the first parallel work
        # so that the OpenMP threads inherit it; and the thread count set on purpose so that the pool does not
        # oversubscribe the cores (Ray would leave OMP_NUM_THREADS at the actor's num_cpus)
        torch.set_flush_denormal(True)
        torch.set_num_threads(threads)
        self.job = job
        self.seg = Segmenter.from_checkpoint(job.checkpoint, backend=job.backend, **job.segmenter_options)
        self.legend_done = False

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from ..hardware import flush_denormal

        with flush_denormal():  # the flag is per thread: this call may run on another thread than __init__
            rows = [self._one(i, s, st) for i, s, st in zip(batch.column("index").to_pylist(),
                                                              batch.column("source").to_pylist(),
                                                              batch.column("stem").to_pylist())]
        return pa.Table.from_pylist(rows, schema=_schema())

    def _one(self, index: int, source: str, stem: str) -> dict[str, Any]:
        import numpy as np

        from ..data.io import read_image
        from ..files import write_group

        job, start = self.job, time.perf_counter()
        row: dict[str, Any] = dict(index=index, source=source, outputs=job.files.names(stem), status="ok",
                                   error="", class_shares=[], seconds=0.0)
        try:
            image = read_image(source)
            pred = self.seg.segment(image, probs=job.files.needs_probs)
            write_group(job.files.group(job.out, stem, image, pred, self.seg.colors), overwrite=job.overwrite,
                        keep_identical=True)
            counts = np.bincount(pred.mask.numpy().ravel(), minlength=self.seg.num_classes)
            row["class_shares"] = (counts / max(1, counts.sum())).tolist()
        except OutputExistsError as e:
            row.update(status="skipped", error=f"{e} (another run wrote it; --overwrite replaces it)")
        except (FcnsegError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            row.update(status="failed", error=msg if source in msg else f"{show_path(source)}: {msg}")
        if row["status"] == "ok" and not self.legend_done:
            self._legend(row)
        row["seconds"] = time.perf_counter() - start
        return row

    def _legend(self, row: dict[str, Any]) -> None:
        """``legend.png`` once something is written, as predict writes it (a replace: every actor writes the
        same bytes); a failure to write it is said in the row's error, the image itself stays ok."""
        try:
            atomic_write(self.job.out / "legend.png",
                         lambda tmp: legend(self.seg.classes, self.seg.colors).save(tmp, format="PNG"))
            self.legend_done = True
        except OutputWriteError as e:
            row["error"] = str(e)


def _schema():
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("source", pa.string()), ("outputs", pa.list_(pa.string())), ("status", pa.string()),
                      ("error", pa.string()), ("class_shares", pa.list_(pa.float64())), ("seconds", pa.float64())])


# -- the manifest ----------------------------------------------------------------------------------------

def read_journal(out: Path) -> dict[str, dict[str, Any]]:
    """The rows recorded in ``OUT/manifest.jsonl`` (the last row per source wins; a line cut by a crash is
    ignored), or those of ``OUT/manifest.parquet`` when there is no journal."""
    rows: dict[str, dict[str, Any]] = {}
    journal, manifest = out / JOURNAL, out / MANIFEST
    if journal.is_file():
        with open(journal, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed driver
                if isinstance(row, dict) and isinstance(row.get("source"), str):
                    rows[row["source"]] = row
    elif manifest.is_file():
        import pyarrow.parquet as pq

        for row in pq.read_table(manifest).to_pylist():
            rows[row["source"]] = row
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[dict[str, Any]], group: int = 1024) -> None:
    """Stream ``rows`` into the Parquet file ``path`` in row groups of ``group`` rows: memory holds one group,
    however many rows there are (the job's rows are produced while this writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    with pq.ParquetWriter(path, schema) as writer:
        buf: list[dict[str, Any]] = []
        for row in rows:
            buf.append({k: row.get(k) for k in schema.names})
            if len(buf) >= group:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                buf.clear()
        writer.write_table(pa.Table.from_pylist(buf, schema=schema))


# -- Ray itself --------------------------------------------------------------------------------------------

def import_ray():
    """``ray`` and ``ray.data``, or a one-line ``FcnsegError`` saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FcnsegError(NO_RAY) from None
    return ray


def check_address(address: str) -> None:
    """``HOST:PORT`` (or ``auto``) that answers on TCP, checked in seconds before Ray tries for longer."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FcnsegError(f"--address {address!r}: expected HOST:PORT of a Ray head (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise FcnsegError(f"--address {address}: cannot reach a Ray head there ({e.strerror or e}); start one with "
                          f"'ray start --head', or leave --address out for a local Ray; {TOKEN_HINT}") from None


def quiet_ray() -> None:
    """Keep Ray's and Ray Data's INFO lines and progress bars out of a command's output (for programs: this
    changes process-wide logging and Ray Data's context). Ray's warnings about its own set-up (token
    authentication enabled, progress bars off, actors waiting for blocks) go too; errors stay."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.data import DataContext
    except ImportError:
        return
    import warnings

    with warnings.catch_warnings():  # Ray Data's own context warns about its own deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


class _Session:
    """``ray.init`` for the job and its undoing: an embedded Ray in a temp dir of its own, removed at the end
    (no daemon left behind); a joined cluster is only disconnected from."""

    def __init__(self, ray, address: str | None) -> None:
        self.ray, self.address, self.tmp = ray, address, None

    def __enter__(self):
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                      configure_logging=False)
        if self.address is None:
            self.tmp = tempfile.mkdtemp(prefix="fcnseg-ray-")
            kwargs.update(address="local", _temp_dir=self.tmp, num_cpus=os.cpu_count() or 1)
        else:
            kwargs.update(address=self.address)
        try:
            self.ray.init(**kwargs)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError, its own types...
            self.__exit__(None, None, None)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray"
            raise FcnsegError(f"could not {where} ({first}); {TOKEN_HINT}") from None
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)


def _threads(ray, job: RayJob) -> int:
    """torch threads (= Ray CPUs) per actor: as asked, else the cluster's CPUs shared among the actors,
    never more than the largest node has (an actor asking for more could never be placed)."""
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    biggest = int(max(nodes, default=1)) or 1
    want = job.worker_threads or max(1, int(sum(nodes)) // max(1, job.num_workers))
    return max(1, min(want, biggest))


# -- the job -------------------------------------------------------------------------------------------------

def source_key(path: Path) -> str:
    """An input as the manifest names it: its absolute path, so that --resume from another folder finds it."""
    return os.path.abspath(path)


def settled_row(job: RayJob, index: int, path: Path, stem: str, prev: dict[str, Any] | None) -> dict | None:
    """The row of an input settled before any work, or None when the actors must segment it: outputs that
    exist are skipped, as predict skips them, unless --overwrite; with --resume, an input recorded ok whose files
    are all there is carried over (``prev``, its row in the journal) and the rest recomputed, any earlier file
    accepted only if identical."""
    names = job.files.names(stem)
    there = [n for n in names if (job.out / n).exists()]
    if job.resume and prev and prev.get("status") == "ok" and prev.get("outputs") == names and \
            len(there) == len(names):
        return dict(prev, index=index)
    if there and not (job.overwrite or job.resume):
        return dict(index=index, source=source_key(path), outputs=names, status="skipped", class_shares=[],
                    seconds=0.0, error=f"{show_path(job.out / there[0])}: exists already, not replaced "
                                       f"(--overwrite replaces it)")
    return None


def check_fresh_manifest(job: RayJob) -> None:
    """Without --resume or --overwrite, a manifest of an earlier job in OUT is not silently mixed with this one."""
    if not (job.resume or job.overwrite) and ((job.out / JOURNAL).exists() or (job.out / MANIFEST).exists()):
        raise FcnsegError(f"{show_path(job.out)} holds the manifest of an earlier job; --resume continues it, "
                          f"--overwrite starts again, or choose another --out")


def run_job(job: RayJob, inputs: Sequence[tuple[Path, str]], report: Callable[[str], None],
            progress: bool = True) -> RayOutcome:
    """Run the job: every input gets one manifest row (ok, failed or skipped); each failed or skipped input is
    reported once through ``report``. Needs Ray; see the module docstring for what is retried. The rows stream
    into ``OUT/manifest.parquet`` as they come (settled inputs first, then in the order the actors finish them;
    ``index`` is the input's position), so memory does not grow with the number of inputs."""
    from ..files import clean_stale_temps

    ray = import_ray()
    check_fresh_manifest(job)
    if job.address is not None:
        check_address(job.address)  # before anything is created in OUT
    job.out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(job.out)
    outcome, start = RayOutcome(), time.perf_counter()
    atomic_write(job.out / MANIFEST, lambda tmp: write_manifest(tmp, _rows(ray, job, inputs, report, progress,
                                                                            outcome)))
    outcome.seconds = time.perf_counter() - start
    return outcome


def _rows(ray, job: RayJob, inputs: Sequence[tuple[Path, str]], report: Callable[[str], None], progress: bool,
          outcome: RayOutcome) -> Iterator[dict[str, Any]]:
    """Every input's row, counted in ``outcome``: the settled ones, then the actors' results (each appended to
    the journal as it comes), then a failed row for any input Ray lost without an error (never silently)."""
    recorded = read_journal(job.out) if job.resume else {}
    seen = bytearray(len(inputs))  # one byte per input: which have a row
    todo: dict[str, list] = {"index": [], "source": [], "stem": []}
    for i, (path, stem) in enumerate(inputs):
        row = settled_row(job, i, path, stem, recorded.get(source_key(path)))
        if row is None:
            for k, v in zip(todo, (i, source_key(path), stem)):
                todo[k].append(v)
            continue
        before = row["status"] == "ok"
        outcome.count(row, before=before)
        if not before:
            report(row["error"])
        seen[i] = 1
        yield row
    recorded.clear()
    try:
        if todo["index"]:
            with _Session(ray, job.address), open(job.out / JOURNAL, "a" if job.resume else "w",
                                                     encoding="utf-8") as journal:
                for row in _stream(ray, job, todo, progress):
                    journal.write(json.dumps(row) + "\n")
                    journal.flush()
                    outcome.count(row)
                    if row["status"] != "ok":
                        report(row["error"])
                    seen[row["index"]] = 1
                    yield row
        elif not (job.out / JOURNAL).exists():
            (job.out / JOURNAL).touch()
    except OSError as e:  # said of the journal here, not of the manifest being written around this
        raise OutputWriteError(f"{show_path(job.out / JOURNAL)}: could not write ({e.strerror or e})") from None
    for i in (i for i, s in enumerate(seen) if not s):
        path = inputs[i][0]
        row = dict(index=i, source=source_key(path), outputs=[], status="failed", class_shares=[], seconds=0.0,
                   error=f"{show_path(path)}: no result came back from the Ray job")
        report(row["error"])
        outcome.count(row)
        yield row


def _stream(ray, job: RayJob, todo: dict[str, list], progress: bool) -> Iterator[dict[str, Any]]:
    """Result rows as the actors finish them, with a progress bar (images/s) on stderr. ``todo`` holds the
    columns index, source and stem; they go to Ray as Arrow blocks (compact: about the paths' bytes)."""
    import sys

    import pyarrow as pa
    from tqdm import tqdm

    threads = _threads(ray, job)
    table, n = pa.table(todo), len(todo["index"])
    todo.clear()
    # small blocks (up to a bound on their number): every actor gets work, and a retry redoes one small block
    blocks = max(job.num_workers, min(-(-n // job.batch_size), 4 * 1024))
    size = -(-n // blocks)
    ds = ray.data.from_arrow([table.slice(k, size) for k in range(0, n, size)])
    ds = ds.map_batches(_Predictor, fn_constructor_kwargs=dict(job=job, threads=threads), batch_size=job.batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=job.num_workers),
                        num_cpus=threads)
    with tqdm(total=n, unit="image", disable=not progress, file=sys.stderr) as bar:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.to_pylist()
                yield from rows
                bar.update(len(rows))
        except (ray.exceptions.RayError, RuntimeError) as e:  # an actor that cannot start, a lost cluster
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else type(e).__name__)
            raise FcnsegError(f"the Ray job stopped ({cause.strip()}); the rows so far are in "
                              f"{show_path(job.out / JOURNAL)}: --resume continues") from None


def summary(outcome: RayOutcome, out: Path) -> str:
    """The one line predict prints at the end, with the manifest named."""
    parts = [f"wrote {outcome.written} prediction(s) to {show_path(out)}"]
    if outcome.done_before:
        parts.append(f"{outcome.done_before} done before (--resume)")
    if outcome.skipped:
        parts.append(f"{outcome.skipped} skipped because they exist (--overwrite replaces them)")
    if outcome.failed:
        parts.append(f"{outcome.failed} failed")
    parts.append(f"manifest {show_path(out / MANIFEST)}")
    return "; ".join(parts)


__all__ = ["MANIFEST", "JOURNAL", "RayJob", "RayOutcome", "check_address", "expand_manifests", "import_ray",
           "is_manifest", "quiet_ray", "read_journal", "read_path_list", "run_job", "summary", "write_manifest"]
