"""Load test of `medsight serve`: uvicorn on 127.0.0.1 in its own process, 16 concurrent keep-alive clients,
a bounded number of POST /v1/predict requests (real BreastMNIST PNGs); prints errors, p50/p99 and requests/s.

    python benchmarks/serve_load.py                         # trains a tiny simple_cnn bundle (1 epoch)
    python benchmarks/serve_load.py --bundle runs/breast --backend torch --requests 5000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)
sys.path.insert(0, HERE)

from _common import breast_pngs, bundle_or_train, free_port, pct, serve_process  # noqa: E402


def multipart(data: bytes, name: str = "scan.png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--explain", action="store_true", help="ask for Grad-CAM overlays too")
    ap.add_argument("--queue", type=int, default=None,
                    help="server queue beyond its workers (default: the server's own default, under which a 503 is "
                         "an error; a value given here measures load shedding: 503s are counted apart from errors)")
    args = ap.parse_args(argv)

    bundle = bundle_or_train(args.bundle, args.model)
    pngs = breast_pngs(32)
    bodies = [multipart(p) for p in pngs]
    port = free_port()
    try:
        queue = () if args.queue is None else ("--queue", str(args.queue))
        started = serve_process(bundle, port, "--backend", args.backend, *queue)
        started.__enter__()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        path = "/v1/predict" + ("?explain=true" if args.explain else "")
        lock = threading.Lock()
        counter = {"next": 0}
        latencies: list[float] = []
        errors: list[str] = []
        shed = {"n": 0}
        stop_at = time.time() + args.max_seconds

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while True:
                with lock:
                    i = counter["next"]
                    if i >= args.requests or time.time() > stop_at:
                        break
                    counter["next"] += 1
                body, ctype = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                    r = conn.getresponse()
                    payload = r.read()
                    dt = time.perf_counter() - t0
                    ok = r.status == 200 and "probabilities" in json.loads(payload)
                    if r.status == 503 and args.queue is not None:  # asked for load shedding: not an error
                        with lock:
                            shed["n"] += 1
                        ok = True
                except Exception as e:  # noqa: BLE001
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    dt, ok, payload = time.perf_counter() - t0, False, repr(e).encode()
                with lock:
                    latencies.append(dt)
                    if not ok:
                        errors.append(payload[:200].decode("utf-8", "replace"))
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
    finally:
        started.__exit__(None, None, None)

    n = len(latencies)
    print(f"medsight serve load test: {args.model if not args.bundle else bundle}, backend {args.backend}, "
          f"{args.clients} clients, cpu_count={os.cpu_count()}")
    print(f"{'requests':>8} {'errors':>6} {'503':>6} {'seconds':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  zero-error")
    print(f"{n:>8} {len(errors):>6} {shed['n']:>6} {wall:>8.2f} {n / wall:>8.1f} {pct(latencies, 50):>8.2f} {pct(latencies, 99):>8.2f}  "
          f"{'OK' if not errors and n == args.requests else 'FAIL'}")
    if errors:
        print("first error:", errors[0])
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
