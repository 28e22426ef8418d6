"""Pydantic response models of the REST API (they are what /docs shows)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = "ok"
    model_version: str
    auth_required: bool = Field(description="whether /v1/* needs an API key (X-API-Key or Authorization: Bearer)")


class InputSpec(BaseModel):
    spatial_dims: int
    channels: int
    size: list[int]
    preprocessing: dict = Field(description="the bundle's preprocessing recipe, applied to every upload")


class ModelInfo(BaseModel):
    name: str
    task: str = Field(description="binary, multiclass, multilabel or ordinal")
    classes: list[str]
    input: InputSpec
    threshold: Optional[Union[float, list[float]]] = Field(description="operating threshold used for decisions")
    temperature: float = Field(description="calibration temperature applied to the logits")
    calibrated: bool
    model_version: str
    data: Optional[str] = None
    created: Optional[str] = None
    medsight_version: Optional[str] = None
    metrics: dict[str, dict[str, Optional[float]]] = Field(
        default_factory=dict, description="per split, each metric's value (from metrics.json)")
    max_upload_mb: float
    clinical_columns: list[str] = Field(default_factory=list, description="clinical values required with each scan "
                                                                         "(form field 'clinical', a JSON object)")


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
    heatmap_png: Optional[str] = Field(None, description="base64 PNG: Grad-CAM overlay on the model input "
                                                         "(alpha 0.45); only with ?explain=true")
    colormap_png: Optional[str] = Field(None, description="base64 PNG: the heatmap alone, colour-mapped")
    image_png: Optional[str] = Field(None, description="base64 PNG: the model input as the model saw it")


class ErrorResponse(BaseModel):
    detail: str
