"""PointFlow's LightningDataModule: train/val/test splits of a PC15k tree, or of meshes / voxel grids converted
into that layout once (:mod:`apps.pointflow.convert`) and cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from apps.pointflow.convert import convert_to_pc15k, mesh_category_dirs, settings_hash
from apps.pointflow.pc15k import NORMALIZE_MODES, NormStats, PC15kDataset, category_folder, split_entries
from core.paths import REPO_ROOT, resolve_path

__all__ = ["SOURCES", "DEFAULT_CACHE_DIR", "PointCloudDataModule"]

DEFAULT_CACHE_DIR = REPO_ROOT / "data" / "cache" / "pointflow"
SOURCES = ("pc15k", "mesh", "voxel")


class PointCloudDataModule(pl.LightningDataModule):
    """PC15k train/val/test sets of some categories, from a PC15k tree or converted meshes / voxel grids.

    ``source="pc15k"`` reads ``root`` directly; ``mesh`` and ``voxel`` convert ``root`` once (in
    :meth:`prepare_data`) into ``cache_dir`` (default ``data/cache/pointflow/`` in the repository). Val and test
    use the train split's stats and the first points of each pool (no random subsampling).
    """

    def __init__(
        self,
        root: str,
        source: str = "pc15k",
        categories: str | Sequence[str] = "airplane",
        points: int = 2048,
        eval_points: int = 2048,
        normalize: str = "global",
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_shapes: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if source not in SOURCES:
            raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZE_MODES)}")
        self.root, self.source = str(root), source
        self.categories = [categories] if isinstance(categories, str) else [str(c) for c in categories]
        self.points, self.eval_points, self.normalize = points, eval_points, normalize
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed, self.max_shapes = seed, max_shapes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
        self._convert_categories()  # fail early on a bad category list for a voxel file
        self._sets: dict[str, PC15kDataset] = {}

    @property
    def input_path(self) -> Path:
        """``root``, resolved against the repository root when it does not exist from the current directory."""
        return resolve_path(self.root)

    @property
    def data_root(self) -> Path:
        """The PC15k tree that is read: ``root`` itself, or the conversion's folder in the cache."""
        if self.source == "pc15k":
            return self.input_path
        src = self.input_path.resolve()
        key = settings_hash({"input": str(src), "seed": self.seed, "max_shapes": self.max_shapes})[:10]
        return self.cache_dir / f"{self.source}-{src.stem}-{key}"

    def _convert_categories(self) -> list[str | None]:
        entries = split_entries(self.categories)
        if self.source == "voxel":
            if len(entries) != 1 or entries[0].lower() == "all":
                raise ValueError(f"a voxel file holds one category; give its name, found categories={self.categories}")
            return entries
        return [None] if any(e.lower() == "all" for e in entries) else entries

    def prepare_data(self) -> None:
        """Convert a mesh folder or voxel file into the cache (once; later calls find the completion marker)."""
        src = self.input_path
        if not src.exists():
            raise FileNotFoundError(f"data root {self.root} does not exist (also tried {REPO_ROOT / self.root})")
        if self.source == "pc15k":
            return
        for cat in self._convert_categories():
            convert_to_pc15k(self.source, src, self.data_root, cat, seed=self.seed, max_shapes=self.max_shapes)

    def _dataset_categories(self) -> list[str]:
        if self.source == "pc15k":
            return self.categories
        cats = self._convert_categories()
        if cats == [None]:
            return [category_folder(p.name) for p in mesh_category_dirs(self.input_path)]
        return [category_folder(c) for c in cats]

    def _make(self, split: str, stats: NormStats | None) -> PC15kDataset:
        return PC15kDataset(
            self.data_root,
            self._dataset_categories(),
            split,
            points=self.points,
            eval_points=self.eval_points,
            normalize=self.normalize,
            stats=stats,
            random_subsample=split == "train",
            seed=self.seed,
            max_shapes=self.max_shapes,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the train split (its stats normalise the others) and the splits ``stage`` needs."""
        needs = {"fit": ["val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in ["train", *needs.get(stage, ["val", "test"])]:  # stage None: all
            self._get(split)

    def _get(self, split: str) -> PC15kDataset:
        """The loaded split; loaded here (converting first if needed) when ``setup`` did not load it."""
        if split not in self._sets:
            if not self._sets and self.source != "pc15k":
                self.prepare_data()  # a no-op once converted; lets setup() work without a Trainer
            if split != "train" and "train" not in self._sets:
                self._sets["train"] = self._make("train", None)
            train_stats = self._sets["train"].stats if split != "train" else None
            stats = train_stats if self.normalize in ("global", "axis") else None
            self._sets[split] = self._make(split, stats)
        return self._sets[split]

    @property
    def train_set(self) -> PC15kDataset:
        return self._get("train")

    @property
    def val_set(self) -> PC15kDataset:
        return self._get("val")

    @property
    def test_set(self) -> PC15kDataset:
        return self._get("test")

    @property
    def stats(self) -> NormStats:
        """The train split's normalisation stats (per shape under ``normalize="shape"``)."""
        return self.train_set.stats

    def _loader(self, ds: PC15kDataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle and len(ds) > batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False)
