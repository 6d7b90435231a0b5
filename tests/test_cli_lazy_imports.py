"""`mllmseg --help` and `mllmseg COMMAND --help` import none of the heavy dependencies: checked on `sys.modules` of a
fresh interpreter (not by timing), for the parser build and for every command's help, through the real `main`."""
import json
import os
import subprocess
import sys

from .conftest import REPO_ROOT

HEAVY = ("torch", "transformers", "gradio", "accelerate", "peft", "datasets", "numpy", "PIL", "safetensors",
         "huggingface_hub", "yaml")

PROBE = """
import contextlib, io, json, sys
heavy = json.loads(sys.argv[1])
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
report = {"start": loaded()}
import mllmseg
report["import mllmseg"] = loaded()
from mllmseg.cli import build_parser, main
parser = build_parser()
report["build_parser"] = loaded()
(action,) = [a for a in parser._actions if a.dest == "command"]
report["commands"] = list(action.choices)
for argv in [["--help"]] + [[name, "--help"] for name in action.choices]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit:
            code = exit.code
    report[" ".join(argv)] = {"code": code, "usage": out.getvalue().startswith("usage: mllmseg"), "loaded": loaded()}
print(json.dumps(report))
"""


def test_help_of_every_command_imports_no_heavy_dependency():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["start"] == [] and report["import mllmseg"] == [] and report["build_parser"] == []
    assert {"segment", "chat", "evaluate", "demo", "train", "merge-lora", "quickstart", "release", "env"} <= set(
        report["commands"])
    for argv in ["--help"] + [f"{name} --help" for name in report["commands"]]:
        assert report[argv] == {"code": 0, "usage": True, "loaded": []}, (argv, report[argv])


def test_the_public_classes_still_import_on_first_use():
    """The lazy package keeps `from mllmseg import X` working, and importing the classes registers the auto classes
    (a saved checkpoint carries `auto_map`)."""
    probe = ("import sys, mllmseg; assert 'transformers' not in sys.modules; "
             "from mllmseg import MLLMSegConfig, MLLMSegProcessor; "
             "from transformers import AutoConfig; "
             "print(type(AutoConfig.for_model('mllmseg')).__name__, MLLMSegConfig._auto_class, "
             "MLLMSegProcessor._auto_class, 'MLLMSegConfig' in dir(mllmseg))")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["MLLMSegConfig", "AutoConfig", "AutoProcessor", "True"]
