"""Training throughput: the medsight loop (`train.train_one_epoch`) vs a minimal plain-PyTorch loop over the same
model, batch and optimiser in the same process, plus achieved GFLOP/s of the training step (FlopCounterMode)
against a large matmul on the same machine.

    python benchmarks/throughput.py [--device cpu|cuda] [--model resnet18 --width 0.25 --stem standard]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medsight.config import load_config  # noqa: E402
from medsight.tasks import Task  # noqa: E402
from medsight.train import (DistInfo, autocast_ctx, build_model, build_optimizer, build_schedule,  # noqa: E402
                            memory_format, train_one_epoch)
from medsight.augment import BatchAugment  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_gflops(dev, amp: bool) -> float:
    n = 8192 if dev.type == "cuda" else 2048
    dt = torch.bfloat16 if amp else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    reps = 20 if dev.type == "cuda" else 3
    a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


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
    for e in range(args.epochs + 1):  # interleaved, so load changes on a shared machine hit both loops alike;
        order = list(fns.items())      # the order alternates, so neither loop always runs second (warm caches)
        for loop, (fn, _) in (order if e % 2 else order[::-1]):
            sync(dev)
            t = time.perf_counter()
            fn(e)
            sync(dev)
            if e:  # epoch 0 is warm-up
                times[loop].append(time.perf_counter() - t)
    for loop in fns:
        res[f"{loop}_img_s"] = n / min(times[loop])
    model = fns["medsight"][1]
    x = x_train[:args.batch].float() / 255
    with autocast_ctx(dev, amp):
        res["flops_per_step"] = step_flops(getattr(model, "_orig_mod", model), x, y_train[:args.batch], task)
    res["ratio"] = res["medsight_img_s"] / res["plain_img_s"]
    res["gflops"] = res["flops_per_step"] / args.batch * res["medsight_img_s"] / 1e9
    return res


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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"{a.model} width {a.width} stem {a.stem}, {a.dims}D {a.size}px, batch {a.batch}, device {name}; "
             f"matmul peak fp32 {peak32:.0f} GFLOP/s" + (f", bf16 {peak16:.0f} GFLOP/s" if peak16 else ""), "",
             "| variant | plain loop img/s | medsight loop img/s | ratio | train GFLOP/s | % of matmul |",
             "|---|---|---|---|---|---|"]
    rows = {}
    for label, amp, cl, augm, comp in variants:
        r = bench(a, dev, amp, cl, augm, comp)
        rows[label] = r
        peak = peak16 if amp == "on" else peak32
        lines.append(f"| {label} | {r['plain_img_s']:.0f} | {r['medsight_img_s']:.0f} | {r['ratio']:.3f} | "
                     f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.1f}% |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table)
        Path(a.out).with_suffix(".json").write_text(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16,
                                                                "device": name, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
