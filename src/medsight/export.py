"""Export a bundle's model to ONNX (dynamic batch axis) with a parity check against PyTorch.

The exported graph is the whole :class:`medsight.models.Classifier` (standardisation included): input
``input`` float32 ``(N, C, *size)`` in [0, 1] (and ``clinical`` float32 ``(N, n_tab)``, the encoded clinical
row, for an image + clinical model), outputs ``logits`` ``(N, outputs)`` and ``features`` (the penultimate
features, for the OOD detector); a seed ensemble also ``members`` ``(N, members, outputs)`` (member logits). Test-time augmentation, probabilities, temperature and the decision stay in
Python (``medsight.inference``, ``medsight.tasks``), shared by every backend.

The file records the sha256 of the ``model.pt`` it was exported from (metadata ``medsight.source_sha256``):
:func:`onnx_for_bundle` refuses an ONNX file that does not match the bundle's weights.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from medsight.errors import MedsightError, optional_import
from medsight.utils import atomic_write_bytes

ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4


SOURCE_KEY = "medsight.source_sha256"


def _export_bytes(model: torch.nn.Module, example: tuple, opset: int, source_sha256: str | None = None) -> bytes:
    """ONNX with outputs ``logits`` and, when the model ends in a Linear layer, ``features`` (its input), so
    ONNX Runtime alone gives both the prediction and the Mahalanobis OOD score in one pass."""
    from medsight.errors import ConfigError
    from medsight.ood import WithFeatures

    from medsight.inference import member_layer

    try:
        net, outputs = WithFeatures(model).eval(), ["logits", "features"]
    except ConfigError:
        net, outputs = model, ["logits"]
    if member_layer(model) is not None and len(outputs) == 2:  # a seed ensemble: its member logits as well
        net, outputs = _WithMembers(net, model).eval(), outputs + ["members"]
    inputs = ["input", "clinical"][:len(example)]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, tuple(example), buf, input_names=inputs, output_names=outputs,
            dynamic_axes={**{i: {0: "batch"} for i in inputs}, **{o: {0: "batch"} for o in outputs}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    data = buf.getvalue()
    if source_sha256 is not None:
        onnx = optional_import("onnx")
        m = onnx.load_from_string(data)
        entry = m.metadata_props.add()
        entry.key, entry.value = SOURCE_KEY, source_sha256
        data = m.SerializeToString()
    return data


class _WithMembers(torch.nn.Module):
    """``(logits, features) -> (logits, features, member logits (N, members, outputs))`` of a seed ensemble."""

    def __init__(self, net: torch.nn.Module, model: torch.nn.Module):
        super().__init__()
        from medsight.inference import member_layer

        self.net = net
        self._tap = dict(model.named_modules())[member_layer(model)]

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        box: list[torch.Tensor] = []
        h = self._tap.register_forward_hook(lambda m, inp, out: box.append(inp[0]))
        try:
            logits, feats = self.net(x, *extra)
        finally:
            h.remove()
        return logits, feats, box[0]


def source_sha256(onnx_bytes: bytes) -> str | None:
    """The sha256 of the ``model.pt`` an ONNX file was exported from (``None`` if it does not say)."""
    onnx = optional_import("onnx")
    try:
        m = onnx.load_from_string(onnx_bytes)
    except Exception:  # noqa: BLE001 - not an ONNX file at all
        return None
    return next((p.value for p in m.metadata_props if p.key == SOURCE_KEY), None)


def parity_error(model: torch.nn.Module, onnx_bytes: bytes | str | Path, input_shape: tuple[int, ...], *,
                 batch: int = 4, seed: int = 0, n_tab: int = 0) -> float:
    """Max |torch - onnxruntime| over random inputs in [0, 1] of shape (batch, *input_shape) (and random
    clinical rows of ``n_tab`` features for an image + clinical model)."""
    ort = optional_import("onnxruntime")
    src = onnx_bytes if isinstance(onnx_bytes, bytes) else str(onnx_bytes)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((batch, *input_shape), dtype=np.float32))
    extra = (torch.from_numpy(rng.normal(size=(batch, n_tab)).astype(np.float32)),) if n_tab else ()
    with torch.inference_mode():
        ref = model(x, *extra).float().numpy()
    feeds = {"input": x.numpy(), **({"clinical": extra[0].numpy()} if extra else {})}
    got = sess.run(None, feeds)[0]
    if got.shape != ref.shape:
        raise MedsightError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def onnx_bytes_for(bundle, opset: int = DEFAULT_OPSET, *, atol: float = PARITY_ATOL) -> bytes:
    """The bundle's model as ONNX bytes, checked against PyTorch (max abs diff <= ``atol``) and stamped with the
    sha256 of its ``model.pt``."""

    optional_import("onnx")
    model = bundle.model.eval()
    inp = bundle.meta.input.model_dump()
    shape = (int(inp["channels"]), *(int(s) for s in inp["size"]))
    gen = torch.Generator().manual_seed(0)
    n_tab = int(bundle.fusion["n_tab"]) if bundle.fusion else 0
    example = (torch.rand(1, *shape, generator=gen),) + ((torch.randn(1, n_tab, generator=gen),) if n_tab else ())
    try:
        data = _export_bytes(model, example, opset, bundle.weights_sha256)
    except Exception as e:
        raise MedsightError(f"ONNX export of {bundle.path} ({bundle.meta.model.name}) failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    diff = parity_error(model, data, shape, n_tab=n_tab)
    if not diff <= atol:
        raise MedsightError(f"ONNX export of {bundle.path} does not match PyTorch: max abs diff {diff:.3g} > {atol:g}")
    return data


def onnx_for_bundle(bundle, path: str | Path | None = None) -> bytes:
    """ONNX bytes to serve ``bundle`` with: ``path`` (default ``model.onnx`` in the bundle) when it was exported
    from this bundle's ``model.pt``, otherwise a fresh in-memory export (nothing is written into the bundle).
    An explicit ``path`` that belongs to other weights is refused."""

    p = Path(path) if path is not None else bundle.path / ONNX_NAME
    want = bundle.weights_sha256
    if p.is_file():
        data = p.read_bytes()
        if source_sha256(data) == want:
            return data
        if path is not None:
            raise MedsightError(f"{p} was not exported from {bundle.path / 'model.pt'} (its recorded weights hash "
                                "differs): re-export it with `medsight export`")
    return onnx_bytes_for(bundle)


def export_onnx(bundle_path: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET, *,
                atol: float = PARITY_ATOL) -> Path:
    """Write ``model.onnx`` into the bundle (or to ``out``) and check it against PyTorch; returns its path.

    The file is written atomically and only after the parity check passes (max abs diff <= ``atol``)."""
    from medsight.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    data = onnx_bytes_for(bundle, opset, atol=atol)
    target = Path(out) if out is not None else bundle.path / ONNX_NAME
    if target.is_dir():
        target = target / ONNX_NAME
    return atomic_write_bytes(target, data)
