"""Training in a few named stages (torchvision's reference layout):

``prepare`` (device, seed, model, optimiser, schedule) -> per epoch ``train_one_epoch`` + ``evaluate_logits`` on
validation -> early stopping / best-epoch selection on validation only -> atomic checkpoints every epoch ->
bundle with the best weights. Data that fits the memory budget lives on the device as uint8 tensors and batches
are index slices; larger data is streamed (rows read from the disk cache by DataLoader workers, see ``_batches``)
in the same order; either way a batch is augmented as a batch on the device. Determinism: the permutation, augmentation and dropout of epoch ``e`` come from seed ``(seed, e)``, so
a run resumed from the checkpoint of epoch ``e-1`` continues exactly as an uninterrupted one.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) each rank takes its share of every global batch, gradients are
averaged by DDP (gloo on CPU, NCCL on GPU), and only rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medsight.config import RunConfig
from medsight.data.sources import Dataset
from medsight.errors import ConfigError, MedsightError
from medsight.inference import autocast_ctx, rows_tensor, run_logits
from medsight.models import create_model
from medsight.tasks import Task
from medsight.augment import BatchAugment
from medsight.inference import to_float
from medsight.utils import atomic_torch_save, atomic_write_text, pick_device, seed_everything

Callback = Callable[[str, dict], None]


# --------------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if (device is not None and device.type == "cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


# --------------------------------------------------------------------------------------------- building blocks
def build_model(cfg: RunConfig, task: Task, spatial_dims: int, in_channels: int, input_size) -> nn.Module:
    return create_model(cfg.model.name, spatial_dims=spatial_dims, in_channels=in_channels,
                        num_outputs=task.num_outputs, input_size=input_size, stem=cfg.model.stem,
                        width=cfg.model.width, dropout=cfg.model.dropout)


def model_spec(cfg: RunConfig, task: Task, data: Dataset) -> dict:
    return {"name": cfg.model.name, "spatial_dims": data.spatial_dims, "in_channels": data.in_channels,
            "num_outputs": task.num_outputs, "input_size": list(data.input_size), "stem": cfg.model.stem,
            "width": cfg.model.width, "dropout": cfg.model.dropout}


def param_groups(cfg: RunConfig, model: nn.Module) -> list[dict]:
    """One group at ``train.lr``; when fine-tuning pretrained weights, the backbone at ``lr * backbone_lr`` and the
    new head (the last Linear) at ``lr``."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.model.pretrained or t.backbone_lr == 1.0:
        return [{"params": params, "lr": t.lr}]
    from medsight.pretrained import head_parameters

    head = head_parameters(model)
    return [{"params": [p for p in params if id(p) not in head], "lr": t.lr * t.backbone_lr, "name": "backbone"},
            {"params": [p for p in params if id(p) in head], "lr": t.lr, "name": "head"}]


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(cfg, model)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)


def build_schedule(cfg: RunConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    t = cfg.train
    total = t.epochs * steps_per_epoch
    warm = t.warmup_epochs * steps_per_epoch
    milestones = [int(m * total) for m in t.step_milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if t.schedule == "cosine":
            prog = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
        if t.schedule == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def input_stats(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of stored training images, after scaling to [0, 1] (read a chunk at a time)."""
    shape = tuple(images.shape)
    dims = [0] + list(range(2, len(shape)))
    mean = torch.zeros(shape[1], dtype=torch.float64)
    sq = torch.zeros_like(mean)
    n = 0
    step = 4096 if int(np.prod(shape[1:])) <= 4096 else max(1, (1 << 23) // int(np.prod(shape[1:])))
    for i in range(0, shape[0], step):
        xf = to_float(rows_tensor(images, i, i + step)).double()
        mean += xf.sum(dims)
        sq += (xf * xf).sum(dims)
        n += xf.numel() // shape[1]
    mean /= n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class _Rows(torch.utils.data.Dataset):
    """``rows[i]`` = the stored images of one batch's indices (a DataLoader item, read in a worker)."""

    def __init__(self, images, batches: list[np.ndarray]):
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(self.images[self.batches[i]]))


def stream_workers(requested: int | None) -> int:
    """DataLoader workers reading streamed batches: ``data.workers``, else up to 4 (one core left to train)."""
    if requested is not None:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _batches(x_train, perm: torch.Tensor, batch_size: int, dinfo: DistInfo, device: torch.device, workers: int):
    """This rank's stored-image batches of an epoch, in ``perm`` order: index slices of the tensor in memory, or
    (streaming) rows read from the disk cache by a DataLoader with ``workers`` processes and pinned memory, each
    rank reading only its share of every global batch (the rows a single process would give this rank)."""
    if isinstance(x_train, torch.Tensor):
        perm_dev = perm.to(device)  # one host-to-device copy per epoch, not per step
        for start in range(0, len(perm), batch_size):
            idx = perm_dev[start:start + batch_size]
            if dinfo.world > 1:
                idx = idx[dinfo.rank::dinfo.world]
            yield x_train.index_select(0, idx)
        return
    order = perm.numpy()
    shards = [order[s:s + batch_size][dinfo.rank::dinfo.world] for s in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(_Rows(x_train, shards), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None,
                                         multiprocessing_context="fork" if workers else None)
    for xb in loader:
        yield xb.to(device, non_blocking=True)


def mixup_weight(alpha: float, gen: torch.Generator) -> float:
    """lam ~ Beta(alpha, alpha), drawn from the epoch generator (so every DDP rank draws the same value) and folded
    to lam >= 0.5 so that the batch's own labels keep the larger weight."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def train_one_epoch(model, opt, sched, task: Task, augment: BatchAugment, x_train: torch.Tensor,
                    y_train: torch.Tensor, *, cfg: RunConfig, epoch: int, device: torch.device,
                    class_weights: torch.Tensor | None, dinfo: DistInfo, ema=None,
                    on_step: Callable[[int, int, float], None] | None = None,
                    tab_train: torch.Tensor | None = None, workers: int = 0) -> float:
    """One epoch. ``x_train``: the stored training images as a tensor on the device (in memory), or rows read
    from disk per batch (a :class:`~medsight.data.cache.DiskArray`: streaming, ``workers`` reader processes); both
    see the same batches in the same order."""
    model.train()
    t = cfg.train
    gen = epoch_generator(t.seed, epoch)
    torch.manual_seed(t.seed * 1_000_003 + epoch)  # dropout etc.
    n = len(x_train)
    perm = torch.randperm(n, generator=gen)
    perm_dev = perm.to(device)  # one host-to-device copy per epoch, not per step
    steps = math.ceil(n / t.batch_size)
    total, count = torch.zeros((), device=device), 0
    stored = _batches(x_train, perm, t.batch_size, dinfo, device, workers)
    for step in range(steps):
        idx = perm_dev[step * t.batch_size:(step + 1) * t.batch_size]
        b = len(idx)
        aug_params = augment.sample(b, gen) if augment.cfg.enabled else None
        scale = None
        if dinfo.world > 1:  # this rank's share of the global batch, with the params a single process would use
            sel = torch.arange(dinfo.rank, b, dinfo.world)
            idx = idx[sel.to(device)]
            if aug_params is not None:
                aug_params = augment.select(aug_params, sel)
            # DDP averages gradients over ranks; weight each rank's mean loss by its share of the global batch so
            # the update equals the single-process one also when the last batch does not split evenly
            scale = dinfo.world * len(idx) / b
        idx_dev = idx
        x = to_float(next(stored))
        if aug_params is not None:
            x = augment.apply(x, aug_params)
        if t.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=memory_format(x.dim() - 2))
        y = y_train.index_select(0, idx_dev)
        extra = () if tab_train is None else (tab_train.index_select(0, idx_dev),)
        # drawn per global batch (b), so every DDP rank consumes the epoch generator alike
        lam = mixup_weight(t.mixup, gen) if t.mixup > 0 and b > 1 else None
        if lam is not None:  # blend with the batch reversed (under DDP: within this rank's share)
            x = lam * x + (1 - lam) * x.flip(0)
            extra = tuple(lam * e + (1 - lam) * e.flip(0) for e in extra)
        with autocast_ctx(device, t.amp):
            logits = model(x, *extra)
        loss = task.loss(logits, y, class_weights=class_weights, label_smoothing=t.label_smoothing)
        if lam is not None:
            loss = lam * loss + (1 - lam) * task.loss(logits, y.flip(0), class_weights=class_weights,
                                                      label_smoothing=t.label_smoothing)
        opt.zero_grad(set_to_none=True)
        (loss * scale if scale is not None else loss).backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        total.add_(loss.detach(), alpha=len(idx))  # one op per step, no host sync
        count += len(idx)
        if on_step is not None:
            on_step(step + 1, steps, loss.item())
    stored.close()  # stops the reader processes of a streamed epoch
    if dinfo.world > 1:  # the mean over the global epoch, weighted by each rank's sample count
        tc = torch.stack([total.float(), torch.tensor(float(count), device=device)])
        dist.all_reduce(tc)
        total, count = tc[0], int(tc[1])
    return float(total) / max(1, count)


# --------------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    model: nn.Module
    history: list[dict]
    best_epoch: int
    best_value: float
    model_spec: dict
    stopped_early: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _monitor_value(name: str, metrics: dict, val_loss: float) -> float:
    if name == "loss":
        return -val_loss
    v = metrics.get(name, float("nan"))
    return float(v) if v is not None else float("nan")


def _state_dict(model: nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def fit(cfg: RunConfig, data: Dataset, out_dir: str | Path | None = None, *, resume: bool = False,
        resume_from: str | Path | None = None, callback: Callback | None = None, model: nn.Module | None = None,
        tab: dict[str, np.ndarray] | None = None) -> FitResult:
    """Train ``cfg`` on ``data``; checkpoints go to ``out_dir/checkpoints`` (rank 0 only).

    ``model``: a prebuilt network instead of ``cfg.model`` (e.g. a fusion model); ``tab``: encoded clinical rows
    per split (``{"train": (N, n_tab), "val": ...}``), passed as the model's second input. ``resume_from``: the
    checkpoint to continue from (default ``out_dir/checkpoints/last.pt``); checkpoints are loaded with
    ``weights_only=True``, so a crafted file cannot run code."""
    from medsight.metrics import compute_metrics

    t = cfg.train
    emit = callback or (lambda event, info: None)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    dinfo = init_distributed(device)
    if device.type == "cuda" and dinfo.world > 1:
        device = torch.device("cuda", dinfo.local_rank)
    if t.batch_size % dinfo.world:
        raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by the {dinfo.world} processes")
    seed_everything(t.seed)
    task = Task(data.task, len(data.classes))
    if "val" not in data.splits:
        raise MedsightError(f"dataset {data.name} has no validation split; model selection needs one")

    train_split, val_split = data.splits["train"], data.splits["val"]
    streaming = not isinstance(train_split.images, (np.ndarray, torch.Tensor))  # a DiskArray: read per batch
    x_train = train_split.images if streaming else torch.as_tensor(train_split.images).to(device)
    y_train = task.targets(train_split.labels).to(device)
    tab_train = None if tab is None else torch.as_tensor(np.asarray(tab["train"], dtype=np.float32)).to(device)
    class_weights = task.class_weights(train_split.labels).to(device) if t.class_weights == "balanced" else None

    torch.manual_seed(t.seed)
    pretrained = None
    if model is None:
        model = build_model(cfg, task, data.spatial_dims, data.in_channels, data.input_size)
        if cfg.model.pretrained and not resume:  # a resumed run takes every weight from its checkpoint
            from medsight.pretrained import apply_pretrained

            pretrained = apply_pretrained(model, cfg.model.name, cfg.model.pretrained, data.spatial_dims,
                                          sha256=cfg.model.pretrained_sha256)
            emit("pretrained", pretrained)
    model.set_input_stats(*input_stats(train_split.images))
    model = model.to(device)
    if t.channels_last and data.spatial_dims in (2, 3):
        model = model.to(memory_format=memory_format(data.spatial_dims))
    spec = model_spec(cfg, task, data)
    train_model = model
    if dinfo.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        train_model = torch.compile(train_model)
    opt = build_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(x_train) / t.batch_size)
    sched = build_schedule(cfg, opt, steps_per_epoch)
    ema = None
    if t.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
    augment = BatchAugment(cfg.augment, data.spatial_dims)

    out = Path(out_dir) if out_dir else None
    ckpt_dir = out / "checkpoints" if out else None
    history: list[dict] = []
    best_value, best_epoch, best_state, bad_epochs, start_epoch = -math.inf, -1, None, 0, 0
    stop_ref = -math.inf  # the monitor value an epoch must beat by more than train.min_delta to reset the patience
    if resume:
        last = Path(resume_from) if resume_from is not None else (ckpt_dir / "last.pt" if ckpt_dir else None)
        if last is None or not last.is_file():
            raise MedsightError(f"--resume: no checkpoint at {last}")
        try:
            ck = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MedsightError(f"--resume: checkpoint {last} is unreadable ({type(e).__name__}: {e})") from e
        if ck.get("model_spec") != spec:
            raise MedsightError(f"--resume: checkpoint {last} was made for model {ck.get('model_spec')}, "
                                f"not {spec}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        history, best_value, best_epoch = ck["history"], ck["best_value"], ck["best_epoch"]
        best_state, bad_epochs, start_epoch = ck["best_state"], ck["bad_epochs"], ck["epoch"] + 1
        stop_ref = ck.get("stop_ref", best_value)
        emit("resumed", {"epoch": start_epoch})

    t0 = time.perf_counter()
    stopped = False
    emit("start", {"epochs": t.epochs, "steps": steps_per_epoch, "device": str(device), "start_epoch": start_epoch})
    for epoch in range(start_epoch, t.epochs):
        te = time.perf_counter()
        train_loss = train_one_epoch(
            train_model, opt, sched, task, augment, x_train, y_train, cfg=cfg, epoch=epoch, device=device,
            class_weights=class_weights, dinfo=dinfo, ema=ema, tab_train=tab_train,
            workers=stream_workers(cfg.data.workers) if streaming else 0,
            # per-step events cost a device sync (loss.item()): only when someone listens
            on_step=None if callback is None else
            (lambda s, n, l: emit("step", {"epoch": epoch, "step": s, "steps": n, "loss": l})))
        train_seconds = time.perf_counter() - te
        eval_model = ema.module if ema is not None else model
        # every rank scores the whole validation split with identical weights, so metrics, best epoch and early
        # stopping agree across ranks without a gather
        logits = run_logits(eval_model, val_split.images, device=device, batch_size=t.eval_batch_size,
                            amp=t.amp, tta_flip=t.tta_flip, channels_last=t.channels_last,
                            tab=None if tab is None else tab["val"])
        y_val = task.targets(val_split.labels)
        val_loss = float(task.loss(logits, y_val))
        probs = task.probabilities(logits).numpy()
        val_metrics = compute_metrics(task.name, val_split.labels, probs)
        value = _monitor_value(t.monitor, val_metrics, val_loss)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))},
               "lr": opt.param_groups[0]["lr"], "seconds": round(train_seconds, 3)}
        history.append(row)
        improved = value > best_value or best_epoch < 0
        if improved:  # any gain picks the weights kept ...
            best_value, best_epoch, best_state = value, epoch + 1, _state_dict(eval_model)
        if value > stop_ref + t.min_delta or stop_ref == -math.inf:  # ... only a real one resets the patience
            stop_ref, bad_epochs = value, 0
        else:
            bad_epochs += 1
        if ckpt_dir is not None and dinfo.is_main:
            atomic_torch_save({
                "epoch": epoch, "model": _state_dict(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "history": history, "best_value": best_value, "best_epoch": best_epoch, "best_state": best_state,
                "bad_epochs": bad_epochs, "stop_ref": stop_ref, "model_spec": spec, "config": cfg.model_dump(mode="json"),
            }, ckpt_dir / "last.pt")
        emit("epoch", {**row, "best_epoch": best_epoch, "improved": improved})
        if t.patience is not None and bad_epochs >= t.patience:
            stopped = True
            emit("early_stop", {"epoch": epoch + 1, "best_epoch": best_epoch, "patience": t.patience,
                                "min_delta": t.min_delta, "monitor": t.monitor})
            break
    final = copy.deepcopy(ema.module if ema is not None else model).cpu().to(memory_format=torch.contiguous_format)
    if best_state is not None:
        final.load_state_dict(best_state)
    final.eval()
    return FitResult(model=final, history=history, best_epoch=best_epoch, best_value=best_value, model_spec=spec,
                     stopped_early=stopped, seconds=time.perf_counter() - t0,
                     extra={"device": str(device), "world": dinfo.world, "rank": dinfo.rank,
                            "streamed": streaming, **({"pretrained": pretrained} if pretrained else {})})


def history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    return buf.getvalue()


def write_history(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, history_csv(history))

# --------------------------------------------------------------------------------------------- seed ensembles
def _fit_member(cfg_json: dict, data: Dataset) -> dict:
    """One ensemble member in a worker process: returns what the parent needs to rebuild it (no files)."""
    cfg = RunConfig.model_validate(cfg_json)
    r = fit(cfg, data)
    return {"state": _state_dict(r.model), "history": r.history, "best_epoch": r.best_epoch,
            "best_value": r.best_value, "spec": r.model_spec, "seconds": r.seconds, "extra": r.extra}


def ensemble_workers(cfg: RunConfig, members: int) -> int:
    """Processes to train members in: as many as the cores allow at ``train.threads`` each (CPU only, one
    process, not under torchrun); 1 means one after another."""
    if members < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1 or pick_device(cfg.train.device).type != "cpu":
        return 1
    per = cfg.train.threads or 1
    return max(1, min(members, (os.cpu_count() or 1) // per))


def fit_ensemble(cfg: RunConfig, data: Dataset, *, callback: Callback | None = None,
                 workers: int | None = None) -> FitResult:
    """``train.ensemble`` members with seeds ``seed, seed+1, ...`` (each selected on validation by itself), in
    parallel processes where the cores allow (``workers``; default :func:`ensemble_workers`), else one after
    another; returns one :class:`FitResult` whose model is a :class:`medsight.models.Ensemble`. Members write no
    checkpoints: an interrupted ensemble run starts again."""
    from medsight.models import Ensemble

    n = cfg.train.ensemble
    emit = callback or (lambda event, info: None)
    cfgs = [cfg.model_copy(deep=True) for _ in range(n)]
    for k, c in enumerate(cfgs):
        c.train.seed = cfg.train.seed + k
        c.train.ensemble = 1
    workers = ensemble_workers(cfg, n) if workers is None else max(1, min(workers, n))
    t0 = time.perf_counter()
    results: list[FitResult] = []
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_fit_member, c.model_dump(mode="json"), data) for c in cfgs]
            for k, fut in enumerate(futures):
                try:
                    out = fut.result()
                except MedsightError:
                    raise
                except Exception as e:
                    raise MedsightError(f"ensemble member {k + 1}/{n} failed: {type(e).__name__}: {e}") from e
                task = Task(data.task, len(data.classes))
                model = build_model(cfgs[k], task, data.spatial_dims, data.in_channels, data.input_size)
                model.load_state_dict(out["state"])
                results.append(FitResult(model=model.eval(), history=out["history"], best_epoch=out["best_epoch"],
                                         best_value=out["best_value"], model_spec=out["spec"],
                                         seconds=out["seconds"], extra=out["extra"]))
                emit("member", {"member": k + 1, "members": n, "best_epoch": out["best_epoch"]})
    else:
        for k, c in enumerate(cfgs):
            results.append(fit(c, data, callback=callback))
            emit("member", {"member": k + 1, "members": n, "best_epoch": results[-1].best_epoch})
    history = [{"member": k + 1, **row} for k, r in enumerate(results) for row in r.history]
    info = {"members": n, "seeds": [c.train.seed for c in cfgs], "best_epochs": [r.best_epoch for r in results],
            "epochs_run": [len(r.history) for r in results], "stopped_early": [r.stopped_early for r in results],
            "best_values": [r.best_value for r in results], "workers": workers}
    return FitResult(model=Ensemble([r.model for r in results]).eval(), history=history,
                     best_epoch=max(r.best_epoch for r in results),
                     best_value=float(np.mean([r.best_value for r in results])), model_spec=results[0].model_spec,
                     seconds=time.perf_counter() - t0,
                     extra={"ensemble": info, **({"pretrained": results[0].extra["pretrained"]}
                                                 if results[0].extra.get("pretrained") else {})})
