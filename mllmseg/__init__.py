"""mllmseg: Hugging Face Hub-native MLLMSeg (referring expression segmentation with an InternVL MLLM + DSFF)."""
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

__version__ = "0.1.0"

try:
    from .remote_code.configuration_mllmseg import MLLMSegConfig
    from .remote_code.image_processing_mllmseg import MLLMSegImageProcessor, load_image
    from .remote_code.inference_mllmseg import SegmentationResult
    from .remote_code.mask_decoder_mllmseg import DSFFMaskDecoder, count_mask_decoder_parameters
    from .remote_code.modeling_mllmseg import (
        MLLMSegCausalLMOutputWithPast,
        MLLMSegForConditionalGeneration,
        MLLMSegPreTrainedModel,
    )
    from .remote_code.processing_mllmseg import MLLMSegProcessor
except ImportError as error:
    # The remote code refuses a transformers outside its tested range (UnsupportedTransformersError, which names the
    # installed version and the range). Keep the package importable so that `mllmseg env` can report it; anything
    # else from it raises that same error.
    if not hasattr(error, "supported"):
        raise
    _UNSUPPORTED = error
else:
    _UNSUPPORTED = None
    # Local registration: AutoModel & co. resolve "mllmseg" without trust_remote_code while this package is imported.
    AutoConfig.register("mllmseg", MLLMSegConfig, exist_ok=True)
    AutoModel.register(MLLMSegConfig, MLLMSegForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(MLLMSegConfig, MLLMSegForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(MLLMSegConfig, slow_image_processor_class=MLLMSegImageProcessor, exist_ok=True)
    AutoProcessor.register(MLLMSegConfig, MLLMSegProcessor, exist_ok=True)
    # Remote-code registration: save_pretrained copies the remote_code files and writes `auto_map`, so the saved
    # folder loads with trust_remote_code=True where mllmseg is not installed.
    MLLMSegConfig.register_for_auto_class("AutoConfig")
    MLLMSegForConditionalGeneration.register_for_auto_class("AutoModel")
    MLLMSegImageProcessor.register_for_auto_class("AutoImageProcessor")
    MLLMSegProcessor.register_for_auto_class("AutoProcessor")


def __getattr__(name):
    if _UNSUPPORTED is not None and name in __all__:
        raise _UNSUPPORTED
    raise AttributeError(f"module 'mllmseg' has no attribute {name!r}")


__all__ = [
    "MLLMSegConfig",
    "MLLMSegForConditionalGeneration",
    "MLLMSegPreTrainedModel",
    "MLLMSegProcessor",
    "MLLMSegImageProcessor",
    "SegmentationResult",
    "load_image",
    "MLLMSegCausalLMOutputWithPast",
    "DSFFMaskDecoder",
    "count_mask_decoder_parameters",
]
