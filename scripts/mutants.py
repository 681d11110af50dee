"""Mutation check: apply each curated one-line bug of scripts/mutants.toml to a copy of src/ and show that a test fails.

Each mutant names a file under ``src/fcnseg``, an anchor text that must occur in it exactly once, the text that
replaces it, a one-line description and the tests that must catch it (pytest node ids, files or ``-k`` options).
The working tree is never touched: every worker copies ``src/`` to a temporary folder, writes one mutated file
there, runs the tests with ``PYTHONPATH`` on the copy (``-x``, a time cap per mutant) and puts the file back.

Prints one line per mutant (killed, SURVIVED, ANCHOR-MISSING, TIMEOUT or ERROR) and ``N of M killed`` last;
exits 1 unless every mutant is killed: one that survives, an anchor that does not match exactly once, a run over
the time cap or a test run that errs (pytest exit codes other than 0 and 1, e.g. no tests collected) all fail.

    python scripts/mutants.py                 # all, two at a time
    python scripts/mutants.py -k optimizer    # mutants whose name or description contains 'optimizer'
    python scripts/mutants.py -k golden -v    # options it does not know go to pytest
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fcnseg"
DEFAULT_LIST = ROOT / "scripts" / "mutants.toml"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/fcnseg: the merger updates these when modules move
    anchor: str
    replace: str
    why: str
    tests: tuple[str, ...]


def load(path: Path) -> list[Mutant]:
    """The mutants of a TOML list (``[[mutant]]`` tables), checked field by field."""
    data = tomllib.loads(path.read_text())
    out, names = [], set()
    for i, m in enumerate(data.get("mutant", []), 1):
        missing = [k for k in ("name", "file", "anchor", "replace", "why", "tests") if k not in m]
        if missing:
            raise SystemExit(f"{path}: mutant {i} lacks {', '.join(missing)}")
        if m["name"] in names:
            raise SystemExit(f"{path}: mutant name {m['name']!r} is used twice")
        if m["anchor"] == m["replace"]:
            raise SystemExit(f"{path}: mutant {m['name']!r} replaces its anchor by itself")
        names.add(m["name"])
        tests = m["tests"] if isinstance(m["tests"], list) else [m["tests"]]
        out.append(Mutant(m["name"], m["file"], m["anchor"], m["replace"], m["why"], tuple(tests)))
    return out


def anchor_problem(m: Mutant, src: Path) -> str | None:
    """None when the anchor occurs exactly once in the mutant's file, else what is wrong."""
    path = src / PACKAGE / m.file
    if not path.is_file():
        return f"src/{PACKAGE}/{m.file} does not exist"
    n = path.read_text().count(m.anchor)
    return None if n == 1 else f"anchor found {n} times in src/{PACKAGE}/{m.file}"


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_one(m: Mutant, src: Path, timeout: float, extra: list[str]) -> tuple[str, str, float]:
    """(verdict, detail, seconds) for one mutant, applied to the copy ``src`` and undone afterwards."""
    path = src / PACKAGE / m.file
    original = path.read_text()
    path.write_text(original.replace(m.anchor, m.replace, 1))
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *extra, *m.tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # not counted as killed: these bugs do not hang, the selection is too slow
        return "TIMEOUT", f"over {timeout:.0f} s: narrow its tests or raise --timeout", time.monotonic() - t0
    finally:
        path.write_text(original)
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode == 1:
        hit = _FAILED.search(out)
        return "killed", (hit.group(2) if hit else "a test failed"), seconds
    if proc.returncode == 0:
        return "SURVIVED", "all selected tests passed: " + " ".join(m.tests), seconds
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    return "ERROR", f"pytest exit {proc.returncode}: " + " | ".join(last), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", type=Path, default=DEFAULT_LIST, help="the TOML list of mutants")
    ap.add_argument("-k", dest="select", default="", help="run only mutants whose name or description has this")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once (each on one thread)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant; a run over it fails as TIMEOUT")
    ap.add_argument("--check", action="store_true", help="only check that every anchor matches exactly once")
    args, extra = ap.parse_known_args(argv)
    mutants = [m for m in load(args.list) if args.select in m.name or args.select in m.why]
    if not mutants:
        print(f"no mutant matches {args.select!r}", file=sys.stderr)
        return 1
    src = ROOT / "src"
    bad = {m.name: p for m in mutants if (p := anchor_problem(m, src)) is not None}
    for m in mutants:
        if m.name in bad:
            print(f"ANCHOR-MISSING {m.name}: {bad[m.name]} ({m.why})", flush=True)
    todo = [m for m in mutants if m.name not in bad]
    if args.check:
        print(f"{len(todo)} of {len(mutants)} anchors match exactly once")
        return 1 if bad else 0

    t0 = time.monotonic()
    verdicts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fcnseg-mutants-") as tmp:
        copies: Queue[Path] = Queue()
        for j in range(max(1, args.jobs)):
            copy = Path(tmp) / f"w{j}" / "src"
            shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            copies.put(copy)

        def work(m: Mutant) -> None:
            copy = copies.get()
            try:
                verdict, detail, seconds = run_one(m, copy, args.timeout, extra)
            finally:
                copies.put(copy)
            verdicts[m.name] = verdict
            print(f"{verdict:<8} {m.name} ({seconds:.0f} s): {m.why} -- {detail}", flush=True)

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(work, todo))
    killed = sum(v == "killed" for v in verdicts.values())
    print(f"{killed} of {len(mutants)} killed ({time.monotonic() - t0:.0f} s)")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
