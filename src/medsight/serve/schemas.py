"""Pydantic response models of the REST API (they are what /docs shows)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, Field

from medsight import bundle as bundle_schema


class Health(BaseModel):
    status: str = "ok"
    model_version: str
    auth_required: bool = Field(description="whether /v1/* needs an API key (X-API-Key or Authorization: Bearer)")
    busy: int = Field(0, description="predictions admitted now (running or queued)")
    capacity: int = Field(0, description="most predictions admitted at once (workers + queue); beyond it, or when "
                                         "the expected wait would pass the deadline, 503 + Retry-After")
    receiving: int = Field(0, description="uploads whose body is still arriving (they hold no admission slot)")


class InputSpec(bundle_schema.InputSpec):
    """The bundle's input spec (bundle.json ``input``) and its preprocessing recipe."""
    preprocessing: dict = Field(description="the bundle's preprocessing recipe, applied to every upload")


class ReviewRuleInfo(BaseModel):
    rule: str = Field(description="logit_margin: a margin on the log-odds scale around the threshold")
    margin: float
    target_share: Optional[float] = Field(None, description="share of validation cases the margin was fitted to "
                                                            "flag at most (None: default rule, not fitted)")
    val_share: Optional[float] = Field(None, description="share of validation cases it flags")
    fitted: bool = Field(description="false: the bundle predates the rule and gets the default margin ln 2")
    description: str = Field(description="the rule in words")


class ModelInfo(bundle_schema.BundleCard):
    """The model card: the bundle's own fields (task, classes, threshold, threshold_rule, temperature, data, created,
    medsight_version: :class:`medsight.bundle.BundleCard`, defined once there) and what the service adds."""
    name: str = Field(description="the model architecture (bundle.json: model.name)")
    input: InputSpec
    threshold_display: str = Field("-", description="the threshold as shown to people: 3 significant digits "
                                                    "(one per label); `threshold` is the exact stored value")
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
    review_margin: float = Field(description="a result is flagged for review when the log-odds of a probability "
                                             "are within this of its threshold's (multiclass: the log-probabilities "
                                             "of the top two classes within this of each other); see `review`")
    review: ReviewRuleInfo = Field(description="the bundle's needs-review rule (medsight.review)")
    ood_threshold: Optional[float] = Field(None, description="OOD scores above this are flagged (None: no detector)")
    ensemble_members: Optional[int] = Field(None, description="seed ensembles: the number of members whose mean "
                                                              "logits are served (None: one model)")


class PredictResponse(BaseModel):
    request_id: str
    probabilities: dict[str, float] = Field(description="probability per class name")
    predicted: Optional[Union[str, list[str]]] = Field(
        description="predicted class (multilabel: the positive labels); null for an out-of-distribution scan "
                    "(no class verdict is given, see review_reasons)")
    decision: Optional[Union[int, list[int]]]
    threshold: Optional[Union[float, list[float]]]
    calibrated: bool = Field(description="true when a calibration temperature other than 1 was applied")
    temperature: float
    model_version: str
    ood_score: Optional[float] = Field(None, description="out-of-distribution score (higher = less like the training data)")
    ood_flag: Optional[bool] = Field(None, description="true when the scan does not look like the training data: "
                                                       "treat the prediction as unreliable")
    review: bool = Field(False, description="true when the result must not be read as a verdict: out of distribution "
                                            "or too close to call under the bundle's review rule (see review_reasons "
                                            "and /v1/model `review`)")
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
