"""Build a second Python environment that shares torch with the main one, for testing other dependency releases.

    python .ci/overlay_env.py newest  DIR                    # the newest releases setup.py's ranges allow
    python .ci/overlay_env.py oldest  DIR                    # the lower bounds (requirements/oldest.txt)
    python .ci/overlay_env.py lock    requirements/lock.txt  # write the lock: the newest set, pinned exactly
    python .ci/overlay_env.py only    DIR transformers==5.17.0   # just these (and what they need) over the main env

The set is resolved with `pip install --dry-run --ignore-installed --report` for `.[test]`, with torch held at the
main environment's release (a CUDA build is never fetched); every other package of the set is installed with
`--no-deps --target DIR/site-packages`. `DIR/venv` is an empty venv whose `.pth` puts that folder, then the main
environment's site-packages, on `sys.path` (`site.addsitedir`, so the editable mllmseg and fresh `python -I`
children see it too). Prints the overlay's python. Run it with the main environment's python.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLDEST = REPO / "requirements" / "oldest.txt"
# Not pinned by the lock or the overlays: torch (installed first, for the hardware) and the project itself.
UNPINNED = {"torch", "mllmseg"}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, stdout=sys.stderr)  # stdout: the result only


def resolve(constraints: list[Path], requirements: list[str] | None = None) -> dict[str, str]:
    """{name: version} of every package `pip install .[test]` (or `requirements`) would install into an empty
    environment."""
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={metadata.version('torch').split('+')[0]}\n")
        report = Path(tmp) / "report.json"
        args = ["install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "-c", str(torch_pin)]
        for c in constraints:
            args += ["-c", str(c)]
        _pip(*args, *(requirements or [f"{REPO}[test]"]))
        installs = json.loads(report.read_text())["install"]
    found = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs}
    return {name: version for name, version in sorted(found.items()) if name not in UNPINNED}


def write_lock(path: Path) -> None:
    pins = resolve([])
    header = (
        "# Exact versions of every package of the test environment except torch (pinned in dev.sh) and mllmseg.\n"
        "# Refresh: .venv/bin/python .ci/overlay_env.py lock requirements/lock.txt (see README, 'Versions').\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    os.replace(tmp, path)


def build_overlay(kind: str, folder: Path, requirements: list[str] | None = None) -> Path:
    pins = resolve([OLDEST] if kind == "oldest" else [], requirements if kind == "only" else None)
    folder.mkdir(parents=True, exist_ok=True)
    # Named site-packages: dill (datasets' hashing) pickles modules outside a folder of that name by value.
    packages = folder / "site-packages"
    wanted = "".join(f"{n}=={v}\n" for n, v in pins.items())
    stamp = folder / "pins.txt"
    if not (stamp.exists() and stamp.read_text() == wanted and packages.is_dir()):
        if packages.exists():
            subprocess.run(["rm", "-rf", str(packages)], check=True)
        requirements = folder / "requirements.txt"
        requirements.write_text(wanted)
        _pip("install", "--quiet", "--no-deps", "--target", str(packages), "-r", str(requirements))
        stamp.write_text(wanted)
    venv = folder / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    base_site = sysconfig.get_paths()["purelib"]
    (Path(out.stdout.strip()) / "_mllmseg_overlay.pth").write_text(
        f"import site; site.addsitedir({str(packages)!r}); site.addsitedir({base_site!r})\n"
    )
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["newest", "oldest", "lock", "only"])
    parser.add_argument("path", type=Path, help="the overlay's folder, or the lock file to write")
    parser.add_argument("requirements", nargs="*", help="with `only`: the requirements to install")
    args = parser.parse_args()
    if (args.kind == "only") != bool(args.requirements):
        parser.error("requirements go with `only`, and `only` needs some")
    if args.kind == "lock":
        write_lock(args.path)
        print(args.path)
    else:
        print(build_overlay(args.kind, args.path.resolve(), args.requirements))


if __name__ == "__main__":
    main()
