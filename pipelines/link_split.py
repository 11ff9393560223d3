"""Make a dataset folder of symbolic links to one part of a fixed split (for ``brats-cnn train``).

    python pipelines/link_split.py --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_v3.json --grade hgg --part train validation --out runs/data_hgg

links ``<out>/<case_id>`` -> ``<data>/<case_id>`` for every case of the chosen parts and writes
``<out>/manifest.csv`` (``case_id,grade``), so ``train`` never sees the test cases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--grade", choices=("hgg", "lgg"), nargs="+", required=True)
    parser.add_argument("--part", nargs="+", default=["train", "validation"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    split = json.loads(args.split.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for grade in args.grade:
        for part in args.part:
            for case_id in split[grade].get(part, []):
                source = (args.data / case_id).resolve()
                if not source.is_dir():
                    raise SystemExit(f"{source}: case folder not found")
                link = args.out / case_id
                if not link.exists():
                    link.symlink_to(source, target_is_directory=True)
                rows.append(f"{case_id},{grade.upper()}")
    (args.out / "manifest.csv").write_text("case_id,grade\n" + "\n".join(rows) + "\n")
    print(f"{len(rows)} case(s) linked into {args.out}")


if __name__ == "__main__":
    main()
