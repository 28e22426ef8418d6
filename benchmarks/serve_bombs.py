"""/healthz latency while 8 clients send hostile or heavy uploads to `medsight serve` (127.0.0.1 only).

The server runs in its own process (uvicorn, default admission control: workers = cores, queue = 64).
First an idle reference: /healthz timed alone. Then 8 client processes loop over the bombs below for a bounded time while
one probe (in this process) times /healthz every 20 ms. Printed side by side, with what the server answered to each bomb.

Bombs (all built here, nothing downloaded):
  png-bomb      1-bit PNG, 20000 x 20000 px (400 Mpx) in ~50 kB: refused from its header (element cap)
  png-large     valid 8-bit PNG, 4000 x 3000 px: decoded, preprocessed and predicted (heavy but legitimate)
  nifti-gz      gzip NIfTI volume 256^3 (16 MB inflated from ~20 kB) sent to a 2D model: inflated, then refused
  clinical-big  a 40 MB `clinical` form field beside a valid scan: refused while parsing (64 KB cap)

    python benchmarks/serve_bombs.py                       # trains a tiny simple_cnn bundle (1 epoch)
    python benchmarks/serve_bombs.py --bundle runs/breast --seconds 30
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)
sys.path.insert(0, HERE)

from _common import breast_pngs, bundle_or_train, free_port, pct, serve_process  # noqa: E402

HOST = "127.0.0.1"  # never anything else


def multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def build_bombs(scan: bytes) -> dict[str, tuple[bytes, str]]:
    import nibabel as nib
    from PIL import Image

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    bombs = {"png-bomb": png(Image.new("1", (20000, 20000))),
             "png-large": png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000), dtype=np.uint8)
                                              .cumsum(1, dtype=np.uint8)))}
    vol = nib.Nifti1Image(np.zeros((256, 256, 256), np.uint8), np.eye(4))
    raw = io.BytesIO()
    vol.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    bombs["nifti-gz"] = gzip.compress(raw.getvalue(), 9)
    out = {k: multipart([("file", f"{k}.{'nii.gz' if k == 'nifti-gz' else 'png'}", v)]) for k, v in bombs.items()}
    out["clinical-big"] = multipart([("file", "scan.png", scan), ("clinical", None, b'{"age": "' + b"9" * (40 << 20) + b'"}')])
    return out


class Healthz:
    """Times GET /healthz on its own keep-alive connection."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)

    def once(self) -> tuple[float, bool]:
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", "/healthz")
            r = self.conn.getresponse()
            ok = r.status == 200 and b'"ok"' in r.read()
        except OSError:
            self.conn.close()
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
            ok = False
        return time.perf_counter() - t0, ok


def bomb_client(k: int, port: int, bombs: dict, kinds: list[str], count: int, stop_at: float, q) -> None:
    """One bomb client (its own process): sends bombs round-robin, puts (kind, status, seconds) on ``q``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    for i in range(k, k + count):
        if time.time() > stop_at:
            break
        kind = kinds[i % len(kinds)]
        body, ctype = bombs[kind]
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            r.read()
            status = r.status
            if (r.getheader("connection") or "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            status = 0
        q.put((kind, status, time.perf_counter() - t0))
        if status == 503:
            time.sleep(0.05)
    conn.close()
    q.put(None)


def summary(lat: list[float], errors: int) -> list[str]:
    if not lat:
        return ["0", str(errors), "-", "-", "-"]
    return [str(len(lat)), str(errors), f"{pct(lat, 50):.2f}", f"{pct(lat, 99):.2f}", f"{max(lat) * 1e3:.2f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the bomb clients send (bounded)")
    ap.add_argument("--max-bombs", type=int, default=2000, help="stop after this many bomb requests")
    ap.add_argument("--idle-probes", type=int, default=300)
    args = ap.parse_args(argv)

    bundle = bundle_or_train(args.bundle, args.model)
    bombs = build_bombs(breast_pngs(1)[0])
    port = free_port()
    try:
        started = serve_process(bundle, port, "--backend", args.backend, host=HOST)
        started.__enter__()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        probe = Healthz(port)
        idle, idle_err = [], 0
        for _ in range(args.idle_probes):
            dt, ok = probe.once()
            idle.append(dt)
            idle_err += not ok
            time.sleep(0.02)

        kinds = list(bombs)
        results: dict[str, list[tuple[int, float]]] = {k: [] for k in kinds}
        # the bomb clients are separate processes (fork), so that their work never delays the probe in this one
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        stop_at = time.time() + args.seconds
        per_client = max(1, args.max_bombs // args.clients)
        procs = [ctx.Process(target=bomb_client, args=(k, port, bombs, kinds, per_client, stop_at, q))
                 for k in range(args.clients)]
        busy, busy_err = [], 0
        t_start = time.perf_counter()
        for p in procs:
            p.start()
        done = 0
        while done < len(procs):
            dt, ok = probe.once()
            busy.append(dt)
            busy_err += not ok
            while not q.empty():
                item = q.get()
                if item is None:
                    done += 1
                else:
                    results[item[0]].append(item[1:])
            time.sleep(0.02)
        for p in procs:
            p.join(30)
        wall = time.perf_counter() - t_start
    finally:
        started.__exit__(None, None, None)

    print(f"medsight serve under bombs: {args.model if not args.bundle else bundle}, backend {args.backend}, "
          f"{args.clients} bomb clients for {wall:.1f} s, cpu_count={os.cpu_count()}, {HOST} only")
    print()
    print(f"{'/healthz':<10} {'probes':>7} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, lat, err in (("idle", idle, idle_err), ("bombs", busy, busy_err)):
        print(f"{label:<10} " + " ".join(f"{v:>{w}}" for v, w in zip(summary(lat, err), (7, 7, 8, 8, 8))))
    print()
    print(f"{'bomb':<13} {'size':>9} {'sent':>5}  {'statuses':<28} {'p50 ms':>8} {'max ms':>8}")
    ok = busy_err == 0 and idle_err == 0
    for kind in kinds:
        rs = results[kind]
        statuses = {}
        for s, _ in rs:
            statuses[s] = statuses.get(s, 0) + 1
        lat = [dt for _, dt in rs]
        st = ", ".join(f"{s}x{n}" for s, n in sorted(statuses.items()))
        size = len(bombs[kind][0])
        print(f"{kind:<13} {size / 1e6:>7.2f}MB {len(rs):>5}  {st:<28} {pct(lat, 50) if lat else 0:>8.1f} "
              f"{max(lat) * 1e3 if lat else 0:>8.1f}")
        ok = ok and all(s != 0 and s < 500 or s in (503, 504) for s in statuses)
    print()
    print("no /healthz errors and no 5xx other than 503/504 from admission control:", "OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
