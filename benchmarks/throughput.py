"""Training throughput: the medsight loop (`train.train_one_epoch`) vs a minimal plain-PyTorch loop over the same
model, batch and optimiser in the same process, plus the achieved GFLOP/s of the training step and of a
``predict``-style forward pass (eval mode, no gradients) against the peak of a large matmul on the same machine.

    python benchmarks/throughput.py --device cpu --threads 1 --model cnn6 --width 1 --stem small --size 28 \
        --batch 64 --out benchmarks/results/throughput_cpu_cnn6_28.md

FLOPs are those of the real forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` (for
``cnn6`` also counted by hand from the layer shapes, and the two must agree). On a CPU every rate is taken per
CPU-second of this process (``time.process_time``), not per wall second: on a shared machine other jobs stretch the
wall clock but not this process's CPU time, so the rate and the peak it is divided by are measured alike. The
peak is a large single-thread float32 matmul (MKL) and, as a second reference, a large 3x3 convolution (oneDNN,
the library the convolutions run in), each the best of several repetitions. The CPU-seconds / wall-seconds ratio
is reported, so a run that used more threads than asked for shows itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medsight.augment import BatchAugment
from medsight.config import load_config
from medsight.tasks import Task
from medsight.train import (
    DistInfo,
    autocast_ctx,
    build_model,
    build_optimizer,
    build_schedule,
    memory_format,
    train_one_epoch,
)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Clock:
    """Wall and CPU seconds of a block; ``rate_s`` is CPU seconds on a CPU device (what contention does not
    stretch), wall seconds on a GPU."""

    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        sync(self.dev)
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.dev)
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c
        self.rate_s = self.cpu if self.dev.type == "cpu" else self.wall


def _best_rate(dev, fn, flops: float, reps: int) -> float:
    fn()
    best = 0.0
    for _ in range(reps):
        with Clock(dev) as c:
            fn()
        best = max(best, flops / c.rate_s / 1e9)
    return best


def matmul_gflops(dev, amp: bool) -> float:
    """Best GFLOP/s of an n x n matmul at the dtype used (n = 4096 on a CPU, 8192 on a GPU)."""
    n = 8192 if dev.type == "cuda" else 4096
    dt = torch.bfloat16 if amp else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    return _best_rate(dev, lambda: a @ b, 2 * n**3, 20 if dev.type == "cuda" else 4)


def conv_gflops(dev) -> float:
    """Best GFLOP/s of a large float32 3x3 convolution (128 -> 128 channels, 28 x 28, batch 64)."""
    x, w = torch.randn(64, 128, 28, 28, device=dev), torch.randn(128, 128, 3, 3, device=dev)
    return _best_rate(dev, lambda: F.conv2d(x, w, padding=1), 2 * 64 * 128 * 128 * 9 * 28 * 28, 4)


def cnn6_hand_flops(size: int, width: float, batch: int) -> int:
    """FLOPs of one cnn6 training step (stride-1 stem, 2D), by hand: forward 2*MACs of the six 3x3 convolutions
    and the head; backward twice the forward (input and weight gradients) less the first conv's input gradient
    (the image needs none)."""
    c = max(1, round(32 * width))
    widths = [(1, c), (c, c), (c, 2 * c), (2 * c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c)]
    sides = [size, size, size // 2, size // 2, size // 4, size // 4]
    convs = [2 * 9 * a * b * s * s for (a, b), s in zip(widths, sides)]
    head = 2 * 4 * c
    fwd = sum(convs) + head
    return batch * (fwd + 2 * fwd - convs[0])


def step_flops(model, x, y, task) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        task.loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def bench(args, dev, amp: str, channels_last: bool, augment: bool, compile_: bool = False) -> dict:
    over = {"model.name": args.model, "model.width": args.width, "model.stem": args.stem,
            "train.batch_size": args.batch, "train.epochs": 100, "train.amp": amp,
            "train.channels_last": channels_last, "augment.enabled": augment, "augment.noise": 0.02}
    cfg = load_config(None, over)
    d = args.dims
    task = Task("binary", 2)
    n = args.batch * args.steps
    g = torch.Generator().manual_seed(0)
    x_train = torch.randint(0, 256, (n, 1) + (args.size,) * d, dtype=torch.uint8, generator=g).to(dev)
    y_train = torch.randint(0, 2, (n,), generator=g).to(dev)
    res = {}
    fns = {}
    for loop in ("plain", "medsight"):
        torch.manual_seed(0)
        model = build_model(cfg, task, d, 1, (args.size,) * d).to(dev)
        if channels_last:
            model = model.to(memory_format=memory_format(d))
        opt = build_optimizer(cfg, model)
        if compile_:
            model = torch.compile(model)
        sched = build_schedule(cfg, opt, args.steps)
        aug = BatchAugment(cfg.augment, d)
        gen = torch.Generator().manual_seed(1)

        def plain_epoch(epoch, model=model, opt=opt, sched=sched, aug=aug, gen=gen):
            model.train()
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(dev)
            for s in range(args.steps):
                idx = perm[s * args.batch:(s + 1) * args.batch]
                x = x_train.index_select(0, idx).float().div_(255)
                if augment:  # the same batched augmentation, called directly
                    x = aug(x, gen)
                if channels_last:
                    x = x.contiguous(memory_format=memory_format(d))
                with autocast_ctx(dev, amp):
                    out = model(x)
                loss = F.binary_cross_entropy_with_logits(out.float().reshape(-1), y_train[idx].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

        def med_epoch(epoch, model=model, opt=opt, sched=sched, aug=aug):
            train_one_epoch(model, opt, sched, task, aug, x_train, y_train, cfg=cfg, epoch=epoch, device=dev,
                            class_weights=None, dinfo=DistInfo())

        fns[loop] = (plain_epoch if loop == "plain" else med_epoch, model)
    times = {k: [] for k in fns}
    cpu_per_wall = []
    for e in range(args.epochs + 1):  # interleaved, so load changes on a shared machine hit both loops alike;
        order = list(fns.items())      # the order alternates, so neither loop always runs second (warm caches)
        for loop, (fn, _) in (order if e % 2 else order[::-1]):
            with Clock(dev) as c:
                fn(e)
            if e:  # epoch 0 is warm-up
                times[loop].append(c.rate_s)
                cpu_per_wall.append(c.cpu / c.wall)
    for loop in fns:
        res[f"{loop}_img_s"] = n / min(times[loop])
    model = fns["medsight"][1]
    x = x_train[:args.batch].float() / 255
    with autocast_ctx(dev, amp):
        res["flops_per_step"] = step_flops(getattr(model, "_orig_mod", model), x, y_train[:args.batch], task)
    if args.model == "cnn6" and args.dims == 2 and args.stem == "small":
        hand = cnn6_hand_flops(args.size, args.width, args.batch)
        if abs(hand - res["flops_per_step"]) > 0.001 * hand:
            raise SystemExit(f"FLOP count mismatch: FlopCounterMode {res['flops_per_step']} vs by hand {hand}")
        res["flops_by_hand"] = hand
    res["ratio"] = res["medsight_img_s"] / res["plain_img_s"]
    res["gflops"] = res["flops_per_step"] / args.batch * res["medsight_img_s"] / 1e9
    res["cpu_per_wall"] = max(cpu_per_wall)
    return res


def bench_predict(args, dev, amp: str) -> dict:
    """A predict-style pass: eval mode, ``torch.inference_mode``, batches of 256 (medsight's evaluation batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medsight.config import EVAL_BATCH_SIZE

    cfg = load_config(None, {"model.name": args.model, "model.width": args.width, "model.stem": args.stem,
                             "train.amp": amp})
    torch.manual_seed(0)
    model = build_model(cfg, Task("binary", 2), args.dims, 1, (args.size,) * args.dims).to(dev).eval()
    b = EVAL_BATCH_SIZE
    x = torch.rand((b, 1) + (args.size,) * args.dims, device=dev)
    with FlopCounterMode(display=False) as fc, torch.inference_mode(), autocast_ctx(dev, amp):
        model(x)
    flops = fc.get_total_flops()

    def fwd():
        with torch.inference_mode(), autocast_ctx(dev, amp):
            model(x)

    fwd()
    best, ratio = 0.0, 0.0
    for _ in range(max(3, args.epochs)):
        with Clock(dev) as c:
            for _ in range(4):
                fwd()
        best = max(best, 4 * b / c.rate_s)
        ratio = max(ratio, c.cpu / c.wall)
    return {"img_s": best, "flops_per_image": flops / b, "gflops": flops / b * best / 1e9, "cpu_per_wall": ratio}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--stem", default="standard")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dims", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add a torch.compile variant (slow to compile)")
    ap.add_argument("--out", default=None, help="write the table as Markdown (and .json beside it)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = [("fp32", "off", False, False), ("fp32 + channels_last", "off", True, False),
                ("fp32 + augment", "off", False, True)]
    if dev.type == "cuda":
        variants += [("bf16 autocast", "on", False, False), ("bf16 autocast + channels_last", "on", True, False)]
    variants = [(*v, False) for v in variants]
    if a.compile:
        variants.append(("fp32 + torch.compile", "off", False, False, True))
    peak32 = matmul_gflops(dev, False)
    peak16 = matmul_gflops(dev, True) if dev.type == "cuda" else None
    conv32 = conv_gflops(dev)
    cpu = dev.type == "cpu"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    per = "CPU-second" if cpu else "second"
    lines = [f"{a.model} width {a.width} stem {a.stem}, {a.dims}D {a.size}px, batch {a.batch}, device {name}; "
             f"peak fp32: matmul 4096^2 {peak32:.0f} GFLOP/s, 3x3 conv {conv32:.0f} GFLOP/s"
             + (f"; bf16 matmul {peak16:.0f} GFLOP/s" if peak16 else "")
             + f" (best of 4, per {per}). FLOPs counted by FlopCounterMode"
             + (" and by hand (equal)" if a.model == "cnn6" and a.dims == 2 and a.stem == "small" else "")
             + f"; rates in images per {per}.", "",
             ("| variant | plain loop img/s | medsight loop img/s | ratio | GFLOP/s | % of matmul peak | "
             "% of conv peak | CPU s / wall s |"),
             "|---|---|---|---|---|---|---|---|"]
    rows = {}
    for label, amp, cl, augm, comp in variants:
        r = bench(a, dev, amp, cl, augm, comp)
        rows[label] = r
        peak = peak16 if amp == "on" else peak32
        lines.append(f"| train, {label} ({r['flops_per_step'] / a.batch / 1e6:.1f} MFLOP/image) | "
                     f"{r['plain_img_s']:.0f} | {r['medsight_img_s']:.0f} | {r['ratio']:.3f} | "
                     f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.1f}% | {100 * r['gflops'] / conv32:.1f}% | "
                     f"{r['cpu_per_wall']:.2f} |")
        print(lines[-1], flush=True)
    p = bench_predict(a, dev, "off")
    rows["predict fp32"] = p
    lines.append(f"| predict, fp32, eval batch ({p['flops_per_image'] / 1e6:.1f} MFLOP/image) | - | "
                 f"{p['img_s']:.0f} | - | {p['gflops']:.1f} | {100 * p['gflops'] / peak32:.1f}% | "
                 f"{100 * p['gflops'] / conv32:.1f}% | {p['cpu_per_wall']:.2f} |")
    print(lines[-1], flush=True)
    shared = cpu and min(r["cpu_per_wall"] for r in rows.values()) < 0.9
    if shared:
        lines.append("")
        lines.append("The machine was shared while this ran (this process got well under one core: CPU s / wall s "
                     "above); rates are per CPU-second of this process, so they are not wall-clock throughput.")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table)
        Path(a.out).with_suffix(".json").write_text(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16,
                                                                "peak_conv_fp32": conv32, "rate_per": per,
                                                                "load_at_end": os.getloadavg(),
                                                                "device": name, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
