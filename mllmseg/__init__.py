"""mllmseg: Hugging Face Hub-native MLLMSeg (referring expression segmentation with an InternVL MLLM + DSFF).

The public classes are imported on first use (PEP 562 `__getattr__`), so `import mllmseg` and the `mllmseg`
command line (`mllmseg --help`) stay light: torch and transformers load only when a class is needed. Importing
any of them (or anything under `mllmseg.remote_code`) registers the auto classes; see `remote_code/__init__.py`.
"""
import importlib

__version__ = "0.1.0"

# public name -> the remote-code module that defines it
_EXPORTS = {
    "MLLMSegConfig": "configuration_mllmseg",
    "MLLMSegForConditionalGeneration": "modeling_mllmseg",
    "MLLMSegPreTrainedModel": "modeling_mllmseg",
    "MLLMSegProcessor": "processing_mllmseg",
    "MLLMSegImageProcessor": "image_processing_mllmseg",
    "SegmentationResult": "inference_mllmseg",
    "load_image": "image_processing_mllmseg",
    "MLLMSegCausalLMOutputWithPast": "modeling_mllmseg",
    "DSFFMaskDecoder": "mask_decoder_mllmseg",
    "count_mask_decoder_parameters": "mask_decoder_mllmseg",
}


def __getattr__(name):
    """The public classes, imported on first access. An installed transformers outside the supported range raises
    the remote code's UnsupportedTransformersError (naming both) here; `mllmseg env` never gets this far."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mllmseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".remote_code.{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
