"""What a bug report needs: the versions in use and whether each is inside the range this package is tested on.

The ranges come from the installed package's own metadata (setup.py's `install_requires`, the ranges CI proves)
and, for the remote code that travels inside checkpoints, from `remote_code/compat_mllmseg.py`. Nothing here
imports transformers' model code, so it also works where the installed transformers is unsupported.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

DISTRIBUTION = "mllmseg"
# Optional packages worth naming in a report (no range is claimed for them).
OPTIONAL = ("flash-attn", "deepspeed", "gradio", "sentencepiece")


@dataclass
class PackageStatus:
    name: str
    installed: str | None
    tested_range: str
    in_range: bool | None  # None: no range is claimed

    @property
    def verdict(self) -> str:
        if self.installed is None:
            return "missing" if self.tested_range else "-"
        return {True: "ok", False: "OUTSIDE", None: ""}[self.in_range]


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _contains(spec, version: str) -> bool:
    try:
        return spec.contains(Version(version).public, prereleases=True)  # "2.13.0+cpu" counts as 2.13.0
    except InvalidVersion:
        return False


def runtime_requirements() -> list[Requirement]:
    """setup.py's `install_requires` as the installed distribution records it (extras left out)."""
    found = []
    for line in metadata.requires(DISTRIBUTION) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(req)
    return found


def package_statuses() -> list[PackageStatus]:
    statuses = []
    for req in runtime_requirements():
        version = _installed(req.name)
        spec = ",".join(sorted((str(s) for s in req.specifier), key=lambda s: s.startswith("<")))  # lower bound first
        in_range = None if version is None else (_contains(req.specifier, version) if spec else True)
        statuses.append(PackageStatus(req.name, version, spec, in_range))
    for name in OPTIONAL:
        statuses.append(PackageStatus(name, _installed(name), "", None))
    return statuses


def remote_code_status() -> tuple[str, bool, str]:
    """(supported range, whether the installed transformers is inside it, the error when not) for the remote
    code, by running its own import-time check."""
    try:
        from .remote_code import compat_mllmseg
    except ImportError as error:  # UnsupportedTransformersError, or a transformers too old to import at all
        return getattr(error, "supported", "?"), False, " ".join(str(error).split())
    return compat_mllmseg.SUPPORTED_TRANSFORMERS, True, ""


def environment_report() -> dict:
    """Everything `mllmseg env` prints, as plain data."""
    import torch

    supported, ok, reason = remote_code_status()
    return {
        "mllmseg": _installed(DISTRIBUTION),
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": [asdict(s) | {"verdict": s.verdict} for s in package_statuses()],
        "remote_code": {"transformers_range": supported, "supported": ok, "error": reason},
    }


def format_report(report: dict) -> str:
    lines = [
        f"mllmseg {report['mllmseg']}   python {report['python']}   {report['platform']}",
        f"torch CUDA build: {report['torch_cuda'] or 'none'}; devices: {', '.join(report['cuda_devices']) or 'none'}",
        "",
        f"{'package':<18}{'installed':<16}{'tested range':<20}status",
    ]
    for p in report["packages"]:
        lines.append(f"{p['name']:<18}{p['installed'] or '-':<16}{p['tested_range'] or '-':<20}{p['verdict']}")
    rc = report["remote_code"]
    lines.append("")
    if rc["supported"]:
        lines.append(f"remote code (inside checkpoints): transformers {rc['transformers_range']}: supported")
    else:
        lines.append(f"remote code (inside checkpoints): NOT supported here: {rc['error']}")
    return "\n".join(lines)


__all__ = ["PackageStatus", "package_statuses", "runtime_requirements", "environment_report", "format_report"]
