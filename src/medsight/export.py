"""Export a bundle's model to ONNX (dynamic batch axis) with a parity check against PyTorch.

The exported graph is the whole :class:`medsight.models.Classifier` (standardisation included): input
``input`` float32 ``(N, C, *size)`` in [0, 1], output ``logits`` ``(N, outputs)``. Probabilities, temperature
and the decision stay in Python (``medsight.tasks``), shared by every backend.
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


def _export_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """ONNX with outputs ``logits`` and, when the model ends in a Linear layer, ``features`` (its input), so
    ONNX Runtime alone gives both the prediction and the Mahalanobis OOD score in one pass."""
    from medsight.errors import ConfigError
    from medsight.ood import WithFeatures

    try:
        net, outputs = WithFeatures(model).eval(), ["logits", "features"]
    except ConfigError:
        net, outputs = model, ["logits"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buf, input_names=["input"], output_names=outputs,
            dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return buf.getvalue()


def parity_error(model: torch.nn.Module, onnx_bytes: bytes | str | Path, input_shape: tuple[int, ...], *,
                 batch: int = 4, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over random inputs in [0, 1] of shape (batch, *input_shape)."""
    ort = optional_import("onnxruntime")
    src = onnx_bytes if isinstance(onnx_bytes, bytes) else str(onnx_bytes)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    x = torch.from_numpy(np.random.default_rng(seed).random((batch, *input_shape), dtype=np.float32))
    with torch.inference_mode():
        ref = model(x).float().numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    if got.shape != ref.shape:
        raise MedsightError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def export_onnx(bundle_path: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET, *,
                atol: float = PARITY_ATOL) -> Path:
    """Write ``model.onnx`` into the bundle (or to ``out``) and check it against PyTorch; returns its path.

    The file is written atomically and only after the parity check passes (max abs diff <= ``atol``)."""
    from medsight.bundle import load_bundle

    optional_import("onnx")
    bundle = load_bundle(bundle_path)
    model = bundle.model.eval()
    inp = bundle.meta["input"]
    shape = (int(inp["channels"]), *(int(s) for s in inp["size"]))
    example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    try:
        data = _export_bytes(model, example, opset)
    except Exception as e:
        raise MedsightError(f"ONNX export of {bundle.path} ({bundle.meta['model']['name']}) failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    diff = parity_error(model, data, shape)
    if not diff <= atol:
        raise MedsightError(f"ONNX export of {bundle.path} does not match PyTorch: max abs diff {diff:.3g} > {atol:g}")
    target = Path(out) if out is not None else bundle.path / ONNX_NAME
    if target.is_dir():
        target = target / ONNX_NAME
    return atomic_write_bytes(target, data)
