"""Convert meshes (ModelNet layout) or voxel grids (.npz) into the ShapeNetCore.v2.PC15k layout PointFlow reads.

Examples:
    python -m scripts.pointflow_to_pc15k --source voxel --input data/shapes/modelnet10_chair_voxels32_dev.npz \\
        --output /tmp/chairs.PC15k --category chair
    python -m scripts.pointflow_to_pc15k --source mesh --input ModelNet10 --output ModelNet10.PC15k
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from apps.pointflow.convert import conversion_info, convert_to_pc15k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Convert meshes or voxel grids into the PC15k layout <output>/<synset-or-name>/"
        "{train,val,test}/<id>.npy (float32 (points, 3) per shape). A conversion with the same settings "
        "that already completed in --output is not redone.",
    )
    p.add_argument(
        "--source",
        required=True,
        choices=("mesh", "voxel"),
        help="mesh: a folder <category>/{train,test}/*.{off,obj,ply} (ModelNet layout; val = 10%% of train; "
        "meshes directly under <category>/ are split 80/10/10), "
        "sampled uniformly on each surface with open3d; voxel: an .npz with array 'voxels' (N,1,D,D,D) or "
        "(N,D,D,D), surface by marching cubes, split 80/10/10",
    )
    p.add_argument("--input", required=True, type=Path, help="the mesh folder or the .npz voxel file")
    p.add_argument("--output", required=True, type=Path, help="root of the PC15k tree to write")
    p.add_argument(
        "--category",
        default=None,
        help="mesh: convert only this category folder (default: all); voxel: the category's name (default: the "
        "file's stem). ShapeNet names (chair, airplane, ...) are written under their synset id",
    )
    p.add_argument("--points", type=int, default=15000, help="points sampled per shape (default: 15000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the point sampling (default: 0)")
    p.add_argument(
        "--max-shapes",
        type=int,
        default=None,
        help="convert only the first N shapes (voxel: of the file; mesh: of each category's train and test; "
        "default: all)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        out = convert_to_pc15k(
            args.source,
            args.input,
            args.output,
            category=args.category,
            points=args.points,
            seed=args.seed,
            max_shapes=args.max_shapes,
            progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.time() - start
    input_path = str(args.input.resolve())
    same = {"input": input_path, "source": args.source, "points": args.points, "seed": args.seed}
    same["max_shapes"] = args.max_shapes
    infos = [i for i in conversion_info(out) if all(i[k] == v for k, v in same.items())]
    for info in infos:
        counts = info["counts"]
        state = "reused (already converted)" if info["mtime"] < start else "wrote"
        split_counts = ", ".join(f"{s} {counts[s]}" for s in ("train", "val", "test"))
        print(f"{state} {out / info['folder']} ({info['category']}): {split_counts} shapes of {info['points']} points")
    print(f"done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
