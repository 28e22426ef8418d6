"""A medsight bundle as an MLflow pyfunc model: ``predict`` runs :class:`medsight.predict.Predictor`.

This module is the model's loader (MLflow imports it when the model is loaded); the saving side is
:func:`medsight.tracking.save_pyfunc`, which names this module by its path and does not import it.

    save_pyfunc("runs/breast", "model")                         # medsight.tracking; or `medsight train --track`
    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(pd.DataFrame({"path": ["scan.dcm"]}))
    mlflow models serve -m runs:/<run id>/model --env-manager local    # medsight must be installed there

Input: a DataFrame with a ``path`` column (files on the host that runs the model) and/or an ``image_b64`` column
(the file's bytes, base64; an optional ``name`` column is the file-name hint for the format sniffer and for
messages). Per row the non-empty one is used, ``image_b64`` first. Output: one row per input row with ``file``,
``p_<class>`` per class, ``predicted`` (several labels joined with ``;`` for multi-label), ``decision``,
``ood_score``, ``ood_flag``, ``review`` and ``review_reasons`` (the "needs review" decision and its reasons, the same
as ``medsight predict`` and the service give; an out-of-distribution row has no ``predicted``/``decision``) and
``error`` (set, with the rest empty, when that row could not be used; a bad row
never fails the batch). Probabilities are the same numbers ``medsight predict`` gives for the same files.

Budget: an ``image_b64`` value longer than ``MAX_B64_CHARS`` (50 MB of image) is refused before it is decoded;
decoding then goes through the same readers and element budget as ``medsight serve``. A ``path`` row reads a
file of the serving host: serve such a model only where its callers may read those files.
"""

from __future__ import annotations

import base64
import binascii
import json

import pandas as pd
from mlflow.pyfunc import PythonModel

from medsight.errors import DataError
from medsight.tracking import PYFUNC_BUNDLE_KEY as BUNDLE_KEY

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_B64_CHARS = 4 * ((MAX_UPLOAD_BYTES + 2) // 3)


def _cell(v) -> str | None:
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    s = str(v)
    return s if s.strip() else None


def decode_b64(text: str, name: str) -> bytes:
    if len(text) > MAX_B64_CHARS:
        raise DataError(f"{name}: image_b64 holds {len(text)} characters; the limit is {MAX_B64_CHARS} "
                        f"({MAX_UPLOAD_BYTES // 2**20} MB of image)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{name}: image_b64 is not valid base64 ({e})") from None


class MedsightModel(PythonModel):
    """pyfunc wrapper: the bundle travels as the model's artefact ``bundle``; a Predictor is built on load."""

    def load_context(self, context) -> None:
        from medsight.predict import Predictor

        self.predictor = Predictor(context.artifacts[BUNDLE_KEY], backend="torch")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" not in df.columns and "image_b64" not in df.columns:
            raise DataError(f"input needs a 'path' or an 'image_b64' column; got columns {list(df.columns)}")
        p = self.predictor
        rows = []
        for i, rec in enumerate(df.to_dict("records")):
            b64, path, hint = _cell(rec.get("image_b64")), _cell(rec.get("path")), _cell(rec.get("name"))
            name = hint or path or f"row {i}"
            try:
                if b64 is not None:
                    pred = p.predict_bytes(decode_b64(b64, name), name)
                elif path is not None:
                    pred = p.predict_file(path)
                else:
                    raise DataError(f"row {i}: neither 'path' nor 'image_b64' is set")
            except Exception as e:  # noqa: BLE001 - one bad row must not fail the batch
                pred = p._error(name, e)
            rows.append(self._row(pred))
        cols = ["file", *[f"p_{c}" for c in p.classes], "predicted", "decision", "ood_score", "ood_flag", "review",
                "review_reasons", "error"]
        out = pd.DataFrame(rows, columns=cols)
        for c in ("file", "predicted", "decision", "ood_flag", "review", "review_reasons", "error"):  # None stays None (JSON null), ints stay ints
            out[c] = pd.Series([r[c] for r in rows], dtype=object, index=out.index)
        return out

    def _row(self, pred) -> dict:
        row = {"file": pred.file, "error": pred.error, "ood_score": pred.ood_score, "ood_flag": pred.ood_flag,
               "review": pred.review if pred.ok else None, "review_reasons": list(pred.review_reasons)}
        for c in self.predictor.classes:
            row[f"p_{c}"] = pred.probabilities.get(c) if pred.ok else None
        row["predicted"] = ";".join(pred.predicted) if isinstance(pred.predicted, list) else pred.predicted
        row["decision"] = json.dumps(pred.decision) if isinstance(pred.decision, list) else pred.decision
        return row
