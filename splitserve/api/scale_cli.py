"""`splitserve scale`: resize a running server's worker pools, or drain one worker.

    splitserve scale --url http://HOST:8000 --prefill 2 --decode 3
    splitserve scale --url http://HOST:8000 --drain decode-1 --deadline 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def _post(url: str, body: dict, api_key: str | None, timeout: float) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": {"message": exc.reason}}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="splitserve scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    ap.add_argument("--decode", type=int, default=None, help="decode workers wanted (aggregated: workers)")
    ap.add_argument("--drain", default=None, metavar="WORKER_ID", help="drain this worker instead")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds in-flight requests get to finish on a draining worker before they move")
    ap.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"))
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    base = args.url.rstrip("/")
    if args.drain:
        if args.prefill is not None or args.decode is not None:
            ap.error("--drain acts on one worker: leave out --prefill/--decode")
        body = {} if args.deadline is None else {"deadline_s": args.deadline}
        url = f"{base}/cluster/workers/{urllib.request.quote(args.drain, safe='')}/drain"
    else:
        if args.prefill is None and args.decode is None:
            ap.error("give --prefill and/or --decode (or --drain WORKER_ID)")
        body = {k: v for k, v in (("prefill", args.prefill), ("decode", args.decode)) if v is not None}
        if args.deadline is not None:
            body["drain_deadline_s"] = args.deadline
        url = f"{base}/cluster/scale"
    try:
        status, answer = _post(url, body, args.api_key, args.timeout)
    except (urllib.error.URLError, OSError) as exc:
        print(f"splitserve scale: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        print(f"splitserve scale: {status}: {answer.get('error', {}).get('message', answer)}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0
