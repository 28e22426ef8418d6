"""Pydantic response models of the REST API (they are what /docs shows)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from medsight import bundle as bundle_schema


class Health(BaseModel):
    status: str = "ok"
    model_version: str
    auth_required: bool = Field(description="whether /v1/* needs an API key (X-API-Key or Authorization: Bearer)")
    busy: int = Field(0, description="predictions admitted now (running or queued)")
    capacity: int = Field(0, description="most predictions admitted at once (workers + queue); more get 503")


class InputSpec(bundle_schema.InputSpec):
    """The bundle's input spec (``BundleMeta.input``) and its preprocessing recipe."""
    preprocessing: dict = Field(description="the bundle's preprocessing recipe, applied to every upload")


class ModelInfo(bundle_schema.BundleCard):
    """The model card: the bundle's own fields (:class:`medsight.bundle.BundleCard`, defined once there) and what
    the service adds."""
    model_config = ConfigDict(frozen=False)

    name: str = Field(description="the model architecture (bundle.json: model.name)")
    input: InputSpec
    decision_rule: str = Field("", description="the threshold and how it was chosen, in words")
    positive_class: Optional[str] = Field(None, description="binary tasks: the class whose probability, sensitivity "
                                                            "and threshold are reported (the finding to detect)")
    calibrated: bool
    model_version: str
    metrics: dict[str, dict[str, Optional[float]]] = Field(
        default_factory=dict, description="per split, each metric's value (from metrics.json)")
    max_upload_mb: float
    clinical_columns: list[str] = Field(default_factory=list, description="clinical values required with each scan "
                                                                         "(form field 'clinical', a JSON object)")
    review_margin: float = Field(description="a result is flagged for review when a probability is within this "
                                             "of its threshold (multiclass: the top two within this of each other)")
    ood_threshold: Optional[float] = Field(None, description="OOD scores above this are flagged (None: no detector)")
    ensemble_members: Optional[int] = Field(None, description="seed ensembles: the number of members whose mean "
                                                              "logits are served (None: one model)")

    @classmethod
    def from_bundle(cls, bundle, **service) -> "ModelInfo":
        """The model card of a loaded bundle; ``service``: calibrated, model_version, metrics, max_upload_mb,
        review_margin, ood_threshold."""
        m = bundle.meta
        shared = {n: getattr(m, n) for n in bundle_schema.BundleCard.model_fields}
        return cls(**shared, name=m.model.name, input=InputSpec(**m.input.model_dump(), preprocessing=bundle.recipe),
                   decision_rule=bundle_schema.decision_text(m), positive_class=bundle.positive_class,
                   clinical_columns=list(m.fusion.columns) if m.fusion is not None else [],
                   ensemble_members=m.ensemble.members if m.ensemble is not None else None, **service)


class PredictResponse(BaseModel):
    request_id: str
    probabilities: dict[str, float] = Field(description="probability per class name")
    predicted: Union[str, list[str]] = Field(description="predicted class (multilabel: the positive labels)")
    decision: Union[int, list[int]]
    threshold: Optional[Union[float, list[float]]]
    calibrated: bool = Field(description="true when a calibration temperature other than 1 was applied")
    temperature: float
    model_version: str
    ood_score: Optional[float] = Field(None, description="out-of-distribution score (higher = less like the training data)")
    ood_flag: Optional[bool] = Field(None, description="true when the scan does not look like the training data: "
                                                       "treat the prediction as unreliable")
    review: bool = Field(False, description="true when the result must not be read as a verdict: out of distribution "
                                            "or within review_margin of the threshold (see review_reasons)")
    review_reasons: list[str] = Field(default_factory=list, description="why the result needs review")
    positive_class: Optional[str] = Field(None, description="binary tasks: the class the threshold and decision "
                                                            "are about")
    member_spread: Optional[Union[float, dict[str, float]]] = Field(
        None, description="seed ensembles: standard deviation of the members' probabilities (binary: of the positive "
                          "class; otherwise per class); absent for a single model")
    heatmap_png: Optional[str] = Field(None, description="base64 PNG: Grad-CAM overlay on the model input "
                                                         "(alpha 0.45); only with ?explain=true")
    colormap_png: Optional[str] = Field(None, description="base64 PNG: the heatmap alone, colour-mapped")
    image_png: Optional[str] = Field(None, description="base64 PNG: the model input as the model saw it")
    display_png: Optional[str] = Field(None, description="base64 PNG: the upload at its own resolution (longest side "
                                                         "at most 1024 px), windowed/normalised by the bundle's recipe; "
                                                         "3D: the middle axial slice; only with ?explain=true")
    display_heatmap_png: Optional[str] = Field(None, description="base64 PNG: the heatmap resampled to display_png's "
                                                                 "size, colour-mapped (overlay it with any opacity)")
    display_size: Optional[list[int]] = Field(None, description="[width, height] of display_png")
    colorbar_png: Optional[str] = Field(None, description="base64 PNG: the colour scale, heatmap 0 (left) to 1 (right)")


class ErrorResponse(BaseModel):
    detail: str
