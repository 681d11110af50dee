"""Child process of the trust-boundary fuzz test: runs fcnseg commands on hostile inputs under guards.

    python tests/fuzz_child.py CASES.json RESULTS.json

Guards, set before any case runs: an address-space limit of 2 GiB above what the imports took
(RLIMIT_AS), every outgoing socket connection recorded and refused (the counting proxy in the parent
sees anything that goes through the proxy variables), and a poisoned torch hub cache (set by the
parent through TORCH_HOME). Each case is ``{"name", "argv"}`` for ``fcnseg.cli.main``, or ``{"name",
"call": "read_image"|"read_mask"|"load_checkpoint", "path"}``; its result is the exit code, what it
wrote to stderr, and the type of any exception that escaped.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import socket
import sys
import traceback

import fcnseg  # noqa: F401  (imports done before the memory limit)
import fcnseg.cli
import fcnseg.data.io
from tiny_models import vm_size

CONNECTIONS: list[str] = []
_connect = socket.socket.connect


def _guarded_connect(self, address):
    """Every connection is recorded; only the parent's counting proxy may be reached (so it can count)."""
    CONNECTIONS.append(repr(address))
    proxy = os.environ.get("FUZZ_PROXY_PORT")
    if proxy and isinstance(address, tuple) and address[:2] == ("127.0.0.1", int(proxy)):
        return _connect(self, address)
    raise ConnectionRefusedError(f"fuzz child: no network ({address})")


def run_case(case: dict) -> dict:
    err = io.StringIO()
    out = io.StringIO()
    code, escaped = None, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if "argv" in case:
                code = fcnseg.cli.main(case["argv"])
            elif case["call"] == "load_checkpoint":
                fcnseg.load_checkpoint(case["path"])
                code = 0
            else:
                getattr(fcnseg.data.io, case["call"])(case["path"])
                code = 0
        except fcnseg.errors.FcnsegError as e:  # a library call's clean refusal
            code, escaped = 1, None
            print(f"fcnseg: error: {e}", file=sys.stderr)
        except BaseException as e:  # noqa: BLE001  (anything else is what the test looks for)
            escaped = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
    return {"name": case["name"], "code": code, "stderr": err.getvalue(), "escaped": escaped}


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    socket.socket.connect = _guarded_connect
    limit = vm_size() + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = [run_case(c) for c in cases]
    with open(sys.argv[2], "w") as f:
        json.dump({"results": results, "connections": CONNECTIONS}, f)


if __name__ == "__main__":
    main()
