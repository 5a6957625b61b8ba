#!/usr/bin/env bash
# Download ShapeNetCore.v2.PC15k (the point clouds PointFlow trains on, ~8 GB unzipped) into data/.
# The archive is shared by the PointFlow authors on Google Drive; gdown fetches it (pip install gdown).
#   bash scripts/download_shapenet_pc15k.sh [target dir, default data/]
# Then: python -m apps.pointflow train data=shapenet data.root=data/ShapeNetCore.v2.PC15k
set -euo pipefail
target=${1:-data}
folder_url="https://drive.google.com/drive/folders/1G0rf-6HSHoTll6aH7voh-dXj6hCRhSAQ"
mkdir -p "$target"
if ! command -v gdown >/dev/null 2>&1; then
  echo "gdown is not installed: pip install gdown   (or download ShapeNetCore.v2.PC15k.zip from $folder_url)" >&2
  exit 1
fi
cd "$target"
gdown --folder "$folder_url" -O pointflow_data
zip=$(find pointflow_data -name 'ShapeNetCore.v2.PC15k.zip' | head -n 1)
[ -n "$zip" ] || { echo "ShapeNetCore.v2.PC15k.zip not found in the download; see $folder_url" >&2; exit 1; }
unzip -q "$zip" -d .
echo "ShapeNetCore.v2.PC15k is in $(pwd)/ShapeNetCore.v2.PC15k"
