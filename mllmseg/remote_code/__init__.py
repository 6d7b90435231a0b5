"""The files that travel inside checkpoints as Hugging Face remote code.

They import nothing from the rest of `mllmseg` and only each other by flat relative imports, because
transformers copies remote code into a checkpoint folder file by file. This `__init__.py` is the installed
package's only: it does not travel (a checkpoint's `auto_map` names the module files), and it registers the auto
classes whenever the package's copy of the remote code is imported (it is the one module every such import runs).
"""
try:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .configuration_mllmseg import MLLMSegConfig
    from .image_processing_mllmseg import MLLMSegImageProcessor
    from .modeling_mllmseg import MLLMSegForConditionalGeneration
    from .processing_mllmseg import MLLMSegProcessor
except ImportError as error:
    # The remote code refuses a transformers outside its tested range (UnsupportedTransformersError, which names the
    # installed version and the range). Keep this package importable so that `mllmseg env` can import
    # compat_mllmseg and report it; importing any other remote-code module raises that same error.
    if not hasattr(error, "supported"):
        raise
else:
    # Local registration: AutoModel & co. resolve "mllmseg" without trust_remote_code once the package's remote
    # code is imported (`import mllmseg` alone no longer does it: see mllmseg/__init__.py).
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
