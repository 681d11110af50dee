"""Child process of the crafted-importer-file fuzz (tests/test_importers_hostile.py): runs each case under guards.

    python tests/importer_fuzz_child.py CASES.json RESULTS.jsonl

Each case is ``{"name", "argv"}`` for ``fcnseg.cli.main``. Before the first case the address space is limited to
what the imports took plus ``FUZZ_HEADROOM_MB`` (an allocation past it fails instead of swapping the machine).
One JSON line per case is written and flushed as soon as the case ends, so a case that kills the process (a
signal from native code) is the one after the last line: its exit code, stdout, stderr, the type of any
exception that escaped ``main``, the seconds it took and the peak resident size so far (ru_maxrss, KiB).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
import traceback

import fcnseg.cli
import fcnseg.data.importers  # noqa: F401  (imports done before the memory limit)
import pycocotools.mask  # noqa: F401
from tiny_models import vm_size


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    limit = vm_size() + int(os.environ.get("FUZZ_HEADROOM_MB", "1024")) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open(sys.argv[2], "w") as results:
        results.write(json.dumps({"name": "<start>", "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
                      + "\n")
        results.flush()
        for case in cases:
            out, err = io.StringIO(), io.StringIO()
            code, escaped = None, None
            began = time.perf_counter()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = fcnseg.cli.main(case["argv"])
                except BaseException as e:  # noqa: BLE001  (anything escaping main is what the test looks for)
                    escaped = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
            row = {"name": case["name"], "code": code, "stdout": out.getvalue()[-2000:],
                   "stderr": err.getvalue()[-4000:],
                   "escaped": escaped, "seconds": time.perf_counter() - began,
                   "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
            results.write(json.dumps(row) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
