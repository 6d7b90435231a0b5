"""`transformers.pipeline` for MLLMSeg: referring expression segmentation through transformers' custom-pipeline
mechanism.

A saved checkpoint's ``config.json`` names this class under ``custom_pipelines["image-segmentation"]`` (the Hub
``pipeline_tag`` of MLLMSeg cards), and the file travels with the modelling code, so

    seg = pipeline("image-segmentation", model=folder_or_repo, trust_remote_code=True)
    seg(image, expressions=["the man in red", "all dogs"])

returns, per expression, a plain dict in the shape of transformers' image-segmentation pipeline (``label``,
``score``, ``mask`` as a PIL ``L`` image of 0 / 255) plus ``box`` (xyxy, ``None`` for an empty mask) and
``rejected`` (the model answered ``[REJ]``). Unlike transformers' image-segmentation task, the expressions are
required: what to segment is the point of the model. Everything runs through ``model.segment``, so masks are at the
image's size in the frame a viewer sees (EXIF orientation applied).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import Pipeline

TASK = "image-segmentation"
# What `MLLMSegConfig` writes to `custom_pipelines` (transformers reads "impl" and "pt" from it).
PIPELINE_ENTRY = {"impl": "pipeline_mllmseg.MLLMSegSegmentationPipeline", "pt": ["AutoModel"], "tf": [],
                  "type": "multimodal"}
_SEGMENT_ARGS = ("mode", "tiling", "threshold", "max_new_tokens", "generation_config")


class MLLMSegSegmentationPipeline(Pipeline):
    """Images and referring expressions in, one dict per expression out (see the module docstring)."""

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __call__(self, images, expressions=None, **kwargs):
        """
        Args:
            images: an image (PIL image, path, HWC array), a dict ``{"image": ..., "expressions": ...}``, or a list
                of either.
            expressions: a string or a list of strings, for every image given without its own (a dict's
                ``"expressions"`` wins).
            mode, tiling, threshold, max_new_tokens, generation_config: as in `model.segment`.

        Returns a list of dicts per image (a list of such lists for a list of images).
        """
        return super().__call__(images, expressions=expressions, **kwargs)

    def _sanitize_parameters(self, expressions=None, **kwargs):
        unknown = sorted(set(kwargs) - set(_SEGMENT_ARGS))
        if unknown:
            raise TypeError(f"unexpected argument(s) {unknown}; the pipeline takes expressions and {_SEGMENT_ARGS}")
        return {"expressions": expressions}, dict(kwargs), {}

    def preprocess(self, inputs, expressions=None):
        if isinstance(inputs, dict):
            if "image" not in inputs:
                raise ValueError(f"a dict input needs an 'image' key, got keys {sorted(inputs)}")
            expressions = inputs.get("expressions", expressions)
            inputs = inputs["image"]
        if expressions is None:
            raise ValueError("pass expressions=... (a string or a list of strings): MLLMSeg segments what an "
                             "expression refers to")
        return {"image": inputs, "expressions": [expressions] if isinstance(expressions, str) else list(expressions)}

    def _forward(self, model_inputs, **segment_kwargs):
        result = self.model.segment(self.processor, model_inputs["image"], model_inputs["expressions"], **segment_kwargs)
        # Plain values: the pipeline rebuilds any ModelOutput it moves between devices as a bare ModelOutput.
        return {"records": result.to_records(), "masks": result.masks, "scores": result.scores}

    def postprocess(self, model_outputs):
        return [
            {"label": record["expression"], "score": float(model_outputs["scores"][i]),
             "mask": Image.fromarray(model_outputs["masks"][i].cpu().numpy().astype(np.uint8) * 255),  # mode "L"
             "box": record["box"], "rejected": record["rejected"]}
            for i, record in enumerate(model_outputs["records"])
        ]
