"""Regenerate the README's tiny-model pictures and evaluation table from the shipped weights.

    python docs/regenerate.py [--work DIR] [--count 120] [--steps N]

1. ``mild demo --figure docs/images/demo.png``;
2. ``mild synth --out WORK/heldout --count 120 --seed 4242 --scene all``: held-out scenes
   (the training streams draw from other seeds), every procedural kind in turn;
3. ``mild eval --data WORK/heldout --tiny --out WORK/eval``;
4. copies ``examples.png`` to docs/images/eval_examples.png and puts ``eval.md`` into the
   README between the ``eval-table`` markers.

On the project's 2-core CPU: ~15 min for 120 scenes.
"""

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- eval-table:start -->", "<!-- eval-table:end -->"


def replace_between_markers(text: str, body: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"README.md: needs one {START} before one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{body.rstrip()}\n{END}{tail}"


def main(argv=None) -> int:
    from mild.cli import main as mild

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="regenerate_out", help="where the held-out scenes and eval files go")
    parser.add_argument("--count", type=int, default=120, help="held-out scenes (at least 100 for the README)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of the diffusion methods (default: each model's own)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    images = ROOT / "docs" / "images"
    steps = [["demo", "--out", str(work / "demo"), "--figure", str(images / "demo.png")],
             ["synth", "--out", str(work / "heldout"), "--count", str(args.count), "--seed", "4242", "--scene", "all"],
             ["eval", "--data", str(work / "heldout"), "--tiny", "--out", str(work / "eval")]
             + ([] if args.steps is None else ["--steps", str(args.steps)])]
    for command in steps:
        print("mild " + " ".join(command), flush=True)
        if mild(command) != 0:
            return 1
    shutil.copyfile(work / "eval" / "examples.png", images / "eval_examples.png")
    readme = ROOT / "README.md"
    readme.write_text(replace_between_markers(readme.read_text(), (work / "eval" / "eval.md").read_text()))
    print(f"wrote {images / 'demo.png'}, {images / 'eval_examples.png'} and the README's evaluation table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
