"""The supported dependency range: one declaration, checked at import, and the transformers names that differ
inside it handled by feature (remote_code/compat_mllmseg.py)."""
import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.internvl.modeling_internvl import InternVLModel

from mllmseg.remote_code import compat_mllmseg as compat

from ._models import batch_inputs, tiny

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE = REPO / "mllmseg" / "remote_code"

# Every transformers module the remote code imports from, and the names it takes. A new internal dependency is a
# deliberate choice: add it here, with a compat entry if its name differs inside the supported range.
TRANSFORMERS_IMPORTS = {
    "transformers": {"BatchFeature", "GenerationMixin", "InternVLConfig", "Pipeline", "PreTrainedModel", "initialization"},
    "transformers.cache_utils": {"Cache"},
    "transformers.image_processing_backends": {"PilBackend"},
    "transformers.image_processing_utils": {"BatchFeature"},
    "transformers.image_utils": {"IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "PILImageResampling", "SizeDict"},
    "transformers.modeling_outputs": {"BaseModelOutputWithPooling", "CausalLMOutputWithPast"},
    "transformers.models.got_ocr2.image_processing_pil_got_ocr2": {"get_optimal_tiled_canvas"},
    "transformers.models.internvl.modeling_internvl": {"InternVLModel"},
    "transformers.processing_utils": {"ImagesKwargs", "MultiModalData", "ProcessorMixin", "Unpack"},
    "transformers.utils": {"ModelOutput", "TensorType"},
}


def _transformers_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    # __init__.py is the installed package's (it registers the auto classes) and does not travel in checkpoints.
    for path in sorted(p for p in REMOTE_CODE.glob("*.py") if p.name != "__init__.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                found.setdefault(node.module, set()).update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("transformers."):
                        found.setdefault(alias.name, set())
    return found


def test_remote_code_imports_from_transformers_only_what_the_allowlist_names():
    assert _transformers_imports() == TRANSFORMERS_IMPORTS


def test_allowlisted_names_exist_in_the_installed_transformers():
    import importlib

    for module, names in TRANSFORMERS_IMPORTS.items():
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def _setup_requirements() -> dict[str, Requirement]:
    """setup.py's install_requires, read from the file itself (not an installed copy of it)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no install_requires")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_setup_transformers_range_is_the_remote_code_range():
    spec = _setup_requirements()["transformers"].specifier
    assert {str(s) for s in spec} == {f">={compat.MIN_TRANSFORMERS.rsplit('.0', 1)[0]}", f"<{compat.BELOW_TRANSFORMERS}"}


def test_oldest_environment_pins_every_lower_bound():
    """requirements/oldest.txt (CI's oldest environment) pins exactly the lower bound of each runtime requirement
    that has one (torch aside: it is installed first, for the hardware)."""
    bounds = {}
    for name, req in _setup_requirements().items():
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower and name != "torch":
            bounds[name] = lower[0]
    pins = _pins(REPO / "requirements" / "oldest.txt")
    assert {n: pins.get(n) for n in bounds} == {n: _padded(v, pins.get(n)) for n, v in bounds.items()}


def _padded(bound: str, pin: str | None) -> str | None:
    """`>=5.18` is pinned as 5.18.0: compare as versions."""
    from packaging.version import Version

    return pin if pin is not None and Version(pin) == Version(bound) else bound


def test_lock_pins_every_package_inside_the_ranges():
    """requirements/lock.txt (the README's two commands install it) satisfies setup.py's ranges."""
    pins = _pins(REPO / "requirements" / "lock.txt")
    assert "torch" not in pins  # installed first, pinned in dev.sh
    for name, req in _setup_requirements().items():
        if name == "torch":
            continue
        assert name in pins, f"{name} is not in the lock"
        assert req.specifier.contains(pins[name]), f"lock pins {name}=={pins[name]}, outside {req.specifier}"


@pytest.mark.parametrize("version", ["4.57.6", "5.0.0", "5.17.0", "6.0.0", "6.1.0.dev0"])
def test_version_check_refuses_outside_the_range_naming_both(version):
    with pytest.raises(compat.UnsupportedTransformersError) as info:
        compat.check_transformers(version)
    message = str(info.value)
    assert version in message and compat.SUPPORTED_TRANSFORMERS in message
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize("version", ["5.18.0", "5.23.0", "5.24.0", "5.99.1", "5.18.0.dev0"])
def test_version_check_accepts_the_range(version):
    compat.check_transformers(version)


def test_cache_name_follows_the_installed_transformers():
    """The cache's name is read off InternVLModel.forward and transformers' own output class, never a version."""
    params = set(inspect.signature(InternVLModel.forward).parameters)
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert compat.CACHE_NAME in params and compat.CACHE_NAME in fields
    from mllmseg import MLLMSegCausalLMOutputWithPast

    assert compat.CACHE_NAME in {f.name for f in dataclasses.fields(MLLMSegCausalLMOutputWithPast)}
    assert MLLMSegCausalLMOutputWithPast(**compat.cache_kwargs("c"))[compat.CACHE_NAME] == "c"


def test_pop_cache_takes_either_name_once():
    for name in ("cache", "past_key_values"):
        kwargs = {name: "c", "other": 1}
        assert compat.pop_cache(kwargs) == "c" and kwargs == {"other": 1}
    assert compat.pop_cache({}) is None
    assert compat.pop_cache({"cache": None}, "p") == "p"
    with pytest.raises(ValueError, match="not both"):
        compat.pop_cache({"cache": "c"}, "p")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cached_decoding_under_either_cache_name_equals_the_full_forward(name):
    """A decode step fed the prefill's cache (under the old or the new keyword) gives the full forward's logits,
    and the output carries the cache under the installed release's field name."""
    model, tok = tiny()
    model.eval()
    inputs = batch_inputs(model, tok, [(1, "a red circle")])
    with torch.no_grad():
        full = model(**inputs).logits
        prefix = {k: v[:, :-1] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
        first = model(**prefix, use_cache=True)
        cache = compat.output_cache(first)
        assert cache is not None and cache.get_seq_length() == prefix["input_ids"].shape[1]
        step = model(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"],
                     use_cache=True, **{name: cache})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
    assert step.image_hidden_states is None and first.image_hidden_states is not None


def test_activation_checkpointing_helpers_reach_the_language_model():
    model, _ = tiny()
    compat.enable_activation_checkpointing(model, use_reentrant=False)
    assert model.model.language_model.gradient_checkpointing
    compat.disable_activation_checkpointing(model)
    assert not model.model.language_model.gradient_checkpointing


def test_training_arguments_get_the_checkpointing_kwargs_they_read(tmp_path):
    from mllmseg.training.trainer import training_arguments

    args = training_arguments({"training": {"gradient_checkpointing": True, "max_steps": 1}}, str(tmp_path))
    flag, field = compat.training_checkpointing_fields(type(args))
    assert getattr(args, flag) is True and getattr(args, field) == {"use_reentrant": False}
    args = training_arguments({"training": {"gradient_checkpointing": True, "max_steps": 1,
                                            "gradient_checkpointing_kwargs": {"use_reentrant": True}}}, str(tmp_path))
    assert getattr(args, field) == {"use_reentrant": True}
    args = training_arguments({"training": {"max_steps": 1}}, str(tmp_path))
    assert not getattr(args, flag)


def test_env_command_reports_versions_and_ranges():
    out = subprocess.run([sys.executable, "-m", "mllmseg", "env", "--json"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    report = json.loads(out.stdout)
    packages = {p["name"].lower().replace("_", "-"): p for p in report["packages"]}
    assert packages["transformers"]["installed"] == transformers.__version__
    assert packages["transformers"]["in_range"] is True
    assert packages["torch"]["installed"] == metadata.version("torch")
    assert report["remote_code"] == {"transformers_range": compat.SUPPORTED_TRANSFORMERS, "supported": True,
                                     "error": ""}
    text = subprocess.run([sys.executable, "-m", "mllmseg", "env"], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout
    assert f"transformers {compat.SUPPORTED_TRANSFORMERS}: supported" in text


def test_package_statuses_flag_a_version_outside_its_range():
    from mllmseg.environment import _contains

    spec = Requirement("x>=5.18,<6").specifier
    assert _contains(spec, "5.24.0") and _contains(spec, "5.18.0")
    assert not _contains(spec, "5.17.0") and not _contains(spec, "6.0.0") and not _contains(spec, "garbage")
    assert _contains(Requirement("torch>=2.4").specifier, "2.13.0+cpu")
