"""Freeze a `mllmseg train tiny_base` run into the folder that ships with the package (mllmseg/pretrained/tiny-base).

    mllmseg train tiny_base                                   # about 95 minutes on the 2-core CPU machine
    python benchmarks/ship_tiny_base.py outputs/tiny_base/final
    python benchmarks/ship_tiny_base.py --refresh             # the shipped weights again, with today's remote code

The weights are saved again through the package's classes. In the shipped folder each remote-code file is then a
relative symbolic link to `mllmseg/remote_code/` (one copy of the code in the repository, never out of date; a
pip-installed wheel holds regular copies); `--refresh` re-records the metrics after the remote code changed.

It builds the folder with the release tools (`assemble_release`: weights, remote code, processor, a model card with
the training summary), verifies that it loads alone in a fresh interpreter (`verify_release`), records the metrics
of the fixed small held-out set the tests check exactly (`heldout_metrics.json`), refuses a folder over the 20 MB
budget, and only then replaces the shipped folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

LIMIT_BYTES = 20 * 1024 * 1024
NOTES = """The pretrained tiny base of the `mllmseg` quickstart: InternVL architecture (ViT 4 x 128 on 224 px tiles,
pixel shuffle, MLP projector, a Qwen2-style LLM 4 x 128) plus the DSFF mask decoder, trained from random weights on
synthetic scenes only (coloured circles, squares, triangles and stars; six colours; expressions by colour, shape,
position, size, several targets and none). It stands in for InternVL's pretraining so that the quickstart can
exercise the real fine-tuning path (LoRA, frozen ViT) on a concept it has never seen (the colour cyan). It knows
nothing of natural images.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_final", nargs="?", help="the run's final/ folder (outputs/tiny_base/final)")
    parser.add_argument("--refresh", action="store_true", help="re-save the shipped folder itself (new remote code)")
    parser.add_argument("--dest", default=None, help="default: mllmseg/pretrained/tiny-base")
    args = parser.parse_args(argv)

    from mllmseg.hub.release import assemble_release, find_training_summary, verify_release
    from mllmseg.loading import load_model
    from mllmseg.quickstart import RECORDED_METRICS_FILE, TINY_BASE_DIR, recorded_metrics
    from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
    from mllmseg.remote_code.processing_mllmseg import MLLMSegProcessor

    dest = Path(args.dest) if args.dest else TINY_BASE_DIR
    if bool(args.run_final) == bool(args.refresh):
        parser.error("give RUN_FINAL or --refresh")
    source = dest if args.refresh else Path(args.run_final)
    summary = find_training_summary(source)
    if summary is None:
        parser.error(f"no train_summary.json for {source} (the run's, beside final/)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tiny-base.", dir=dest.parent))
    saved, staging = work / "saved", work / "folder"
    MLLMSegForConditionalGeneration.from_pretrained(source).save_pretrained(saved)
    MLLMSegProcessor.from_pretrained(source).save_pretrained(saved)
    shutil.copy(summary, saved / "train_summary.json")
    report = assemble_release(saved, staging, "mllmseg/tiny-base", training_notes=NOTES)
    shutil.copy(summary, staging / "train_summary.json")  # for --refresh, and for the card's next build
    verify_release(staging)
    model, processor = load_model(str(staging), cpu=True)
    recorded = recorded_metrics(model, processor)
    (staging / RECORDED_METRICS_FILE).write_text(json.dumps(recorded, indent=2) + "\n")
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    if size > LIMIT_BYTES:
        shutil.rmtree(work)
        print(f"refused: {size / 2**20:.1f} MB is over the {LIMIT_BYTES / 2**20:.0f} MB budget", file=sys.stderr)
        return 1
    code_dir = Path(__file__).resolve().parents[1] / "mllmseg" / "remote_code"
    for path in sorted(staging.glob("*.py")):
        twin = code_dir / path.name
        if twin.is_file() and twin.read_bytes() == path.read_bytes():
            path.unlink()
            path.symlink_to(os.path.relpath(twin, dest))
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    shutil.rmtree(work)
    print(f"shipped {dest}: {len(report.files) + 1} files, {size / 2**20:.2f} MB; recorded metrics on "
          f"{recorded['set']}: " + ", ".join(f"{k} {v:.3f}" for k, v in recorded["metrics"].items()
                                              if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
