"""`mllmseg release`: assemble, verify and upload (one commit) a remote-code MLLMSeg checkpoint to the Hub."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "release",
        help="build a verified release folder (safetensors, remote code, processor, README card) and upload it",
        description="Assemble a release folder from MODEL_DIR, verify it in a fresh interpreter that cannot import "
        "mllmseg (AutoModel/AutoProcessor with trust_remote_code=True, no missing/unexpected keys, complete "
        "remote-code imports, no pickle files), then upload it in one commit (HfApi.create_commit).",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved MLLMSeg checkpoint folder")
    parser.add_argument("--repo-id", required=True, help="target Hub model repo, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--dry-run", action="store_true", help="build and verify the folder, upload nothing")
    parser.add_argument("--eval-json", action="append", default=[], metavar="F",
                        help="`mllmseg evaluate` results JSON for the card's metrics and model-index (repeatable)")
    parser.add_argument("--output-dir", help="release folder to build (absent or empty; default: a temporary folder)")
    parser.add_argument("--base-model", help="Hub id of the base InternVL model (card metadata)")
    parser.add_argument("--license", default=None, help="license id for the card (default apache-2.0)")
    parser.add_argument("--dataset", action="append", dest="datasets", metavar="HUB_ID",
                        help="training dataset Hub id for the card metadata (repeatable)")
    parser.add_argument("--training-summary", metavar="F",
                        help="the run's train_summary.json for the card's training section (default: found next to "
                        "MODEL_DIR when `mllmseg train` wrote it)")
    parser.add_argument("--training-notes", metavar="F", help="a Markdown file added to the card's training section")
    parser.add_argument("--commit-message", help="commit message (default: 'Release NAME (MLLMSeg)')")
    parser.add_argument("--skip-verify", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args) -> int:
    from huggingface_hub.utils import validate_repo_id

    from ..hub.cards import load_eval_results
    from ..hub.release import ReleaseError, assemble_release, upload_release, verify_release

    if args.repo_id.count("/") != 1:
        raise ValueError(f"--repo-id must be ORG/NAME, got {args.repo_id!r}")
    validate_repo_id(args.repo_id)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    eval_results = load_eval_results(args.eval_json)
    output_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="mllmseg-release-"))

    notes = ""
    if args.training_notes:
        if not Path(args.training_notes).is_file():
            raise FileNotFoundError(f"--training-notes file not found: {args.training_notes}")
        notes = Path(args.training_notes).read_text(encoding="utf-8")
    print(f"assembling {model_dir} ...", flush=True)
    report = assemble_release(model_dir, output_dir, args.repo_id, eval_results=eval_results,
                              base_model=args.base_model, license=args.license, datasets=args.datasets,
                              training_summary=args.training_summary, training_notes=notes)
    for line in report.notes:
        print(line)
    print(f"release folder: {report.folder} ({len(report.files)} files)")
    for name in report.files:
        print(f"  {name}")
    if report.skipped:
        print(f"not released: {', '.join(report.skipped)}")
    if not args.skip_verify:
        print("verifying: loading the folder alone in a fresh interpreter (AutoModel + AutoProcessor, "
              "trust_remote_code=True); this reads every weight ...", flush=True)
        start = time.monotonic()
        verification = verify_release(report.folder)
        if verification["num_parameters"] != report.num_parameters:
            raise ReleaseError(f"the loaded model has {verification['num_parameters']:,} parameters, the card says "
                               f"{report.num_parameters:,}")
        print(f"verification took {time.monotonic() - start:.0f} s")
        print(f"verified: {verification['model_class'].rsplit('.', 1)[-1]} + "
              f"{verification['processor_class'].rsplit('.', 1)[-1]} load from the folder alone "
              f"({verification['num_parameters']:,} parameters, no missing/unexpected keys, "
              f"{len(report.remote_code)} remote-code files, no pickles)")
    if args.dry_run:
        print(f"dry run: nothing uploaded (would upload to {args.repo_id}"
              f"{' as a pull request' if args.create_pr else ''})")
        return 0
    info = upload_release(report.folder, args.repo_id, private=args.private, create_pr=args.create_pr,
                          commit_message=args.commit_message)
    print(f"uploaded in one commit: {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
    return 0
