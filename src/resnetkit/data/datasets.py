"""Datasets: shapes (built in), CIFAR-10/100 (official python layout), ImageFolder trees, CUB-200-2011.

One entry point names them all, so a config or a CLI flag can say which data to use:

    >>> from resnetkit.data import build_dataset
    >>> ds = build_dataset("shapes", "train", image_size=32)          # also "cifar10", "cifar100", "cub200", or a path
    >>> image, label = ds[0]; ds.classes[label]

Every dataset has `.classes` and `.targets` and yields (uint8 RGB tensor (3, H, W), label) unless given a transform;
image files are read by `resnetkit.data.image.decode_image`, the one decoder. Bad image files are skipped, counted and
reported once with their paths, or raise under `strict` (see `BadImageError`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from resnetkit.data.image import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    BadImageError,
    decode_image,
    parallel_decoders,
)

log = logging.getLogger("resnetkit.data")

BUILTIN = ("shapes", "cifar10", "cifar100", "cub200")
SPLITS = ("train", "val", "test")
SHAPES_SIZES = {"train": 10_000, "test": 2_000}
SHAPES_MULTI_SIZES = {"train": 5_000, "val": 1_000, "test": 1_000}


class SkippedSample:
    """What a non-strict dataset returns in place of a bad file's sample; resnetkit's loaders drop it and report it.
    With your own DataLoader, pass `collate_fn=resnetkit.data.loader.collate_skipping`."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason

    def __repr__(self) -> str:
        return f"SkippedSample({self.path!r}, {self.reason!r})"


def report_skipped(skipped: Sequence[tuple[str, str]], total: int) -> None:
    """Report skipped files once: one warning with the count and every path with its reason."""
    if skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        log.warning("skipped %d of %d image files that could not be read:\n%s", len(skipped), total, lines)


class _FileDataset(torch.utils.data.Dataset):
    """Shared by datasets of image files: samples [(path, label)], bad files skipped or raised."""

    samples: list[tuple[str, int]]
    classes: list[str]

    def __init__(self, transform: Callable | None, strict: bool, max_pixels: int, image_size: int | None):
        self.transform, self.strict, self.max_pixels, self.image_size = transform, strict, max_pixels, image_size
        # The loaders set these from the transform: large JPEGs may be decoded at reduced scale down to this side, or
        # for a random crop chosen before decoding (`resnetkit.data.transforms.RandomResizedCropPlan`).
        self.min_size: int | None = None
        self.crop_plan = None
        self.pixels = None  # a resnetkit.data.fast.PixelCache of these samples: read pixels, not files

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def accepts_decode_hints(self) -> bool:
        """min_size and crop_plan apply (not under a fixed resize or a box crop, which need every pixel)."""
        return not self.image_size and self._box(0) is None if self.samples else False

    def __len__(self) -> int:
        return len(self.samples)

    def _box(self, index: int) -> tuple[int, int, int, int] | None:
        return None  # (top, left, height, width) to crop to: CUB's bird boxes

    def load(self, index: int) -> torch.Tensor:
        """The image of sample `index` as uint8 RGB (3, H, W), before the transform; raises BadImageError."""
        hints = self.accepts_decode_hints
        if self.pixels is not None:  # full-size pixels: the planned crop is cut from them, there is no reduced scale
            size = self.pixels.size(index)
            region = self.crop_plan(*size)[0] if hints and self.crop_plan is not None and size else None
            img = self.pixels.read(index, self.samples[index][0], region)
        else:
            img = decode_image(
                self.samples[index][0],
                max_pixels=self.max_pixels,
                min_size=self.min_size if hints else None,
                crop=self.crop_plan if hints else None,
            )
        box = self._box(index)
        if box is not None:
            img = img[:, box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
        if self.image_size:
            from torchvision.transforms.v2 import functional as F

            img = F.resize(img, self.image_size, antialias=True)
        return img

    def target(self, index: int):
        """Sample `index`'s target: its label (a multi-hot row for a multi-label dataset)."""
        return self.samples[index][1]

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        try:
            img = self.load(index)
        except BadImageError as e:
            if self.strict:
                raise
            return SkippedSample(path, e.reason)
        return (self.transform(img) if self.transform else img), self.target(index)

    def relative_paths(self) -> list[str]:
        """Each sample's path relative to the dataset's root: how split lists name it."""
        return [Path(os.path.relpath(path, self.root)).as_posix() for path, _ in self.samples]

    def select(self, indices: Sequence[int]) -> None:
        """Keep only these samples, in this order (a subset)."""
        self.samples = [self.samples[i] for i in indices]
        self.pixels = None  # it was indexed by the samples before

    def cache_key(self) -> str:
        """A digest of the source files (paths, sizes, modification times): a change invalidates caches."""
        h = hashlib.sha1(type(self).__name__.encode())
        for path, label in self.samples:
            st = os.stat(path)
            h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(repr((self.classes, self.image_size)).encode())
        return h.hexdigest()


class ImageFolder(_FileDataset):
    """A class-per-folder tree: root/<class>/<image> (files with other extensions are ignored). `classes` fixes the
    label order (e.g. the training split's)."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        classes: Sequence[str] | None = None,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_size: int | None = None,
    ):
        super().__init__(transform, strict, max_pixels, image_size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        found = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise ValueError(f"image folder {self.root} has no class folders (expected {self.root}/<class>/<image>)")
        if classes is None:
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{self.root} has class folders not in the training split: {', '.join(extra)}")
        self.classes = list(classes)
        self.samples = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                continue  # an evaluation split may lack a class
            files = sorted(
                entry.path
                for entry in os.scandir(folder)
                if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise ValueError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
            self.samples += [(path, label) for path in files]


PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "image_path")
LABEL_COLUMNS = ("label", "labels")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CSV_COLUMN_KEYS = ("path_column", "label_column", "split_column", "label_separator", "class_columns")


class CsvListing(_FileDataset):
    """Images listed in a CSV or TSV file: a column of paths (relative to the file), the label or labels, and
    optionally a split column (train, val or valid or validation, test).

    columns: path_column (default: the first of path, image, file, filename, filepath, image_path), label_column
    (default label or labels), split_column (default split; absent: one split, to be cut by data.val_fraction),
    multilabel, label_separator (multi-label labels in one column; default: ";" or "|" or "," where a cell holds
    one, else whitespace), class_columns (one 0/1 column per class; [] or unset with no label column: every other
    column). Class columns make the listing multi-label. Classes are those of every row, in sorted order (class
    columns: in column order), so all splits share them. Every bad row of the file (a missing image, an unknown
    split, an empty label, a class cell not 0 or 1) is reported in one error naming the file and line.
    split None: every row (the collection a split list is cut from).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | None = "train",
        transform: Callable | None = None,
        *,
        columns: dict | None = None,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_size: int | None = None,
    ):
        import csv

        super().__init__(transform, strict, max_pixels, image_size)
        self.path = Path(path)
        self.root = self.path.parent  # paths in the listing are relative to it
        opts = dict(columns or {})
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        if not rows or not any(cell.strip() for cell in rows[0]):
            raise ValueError(f"{self.path}: empty listing (expected a header row naming its columns)")
        header = [h.strip() for h in rows[0]]
        lower = {h.lower(): i for i, h in enumerate(header)}

        def column(key: str, default: Sequence[str], required: bool) -> int | None:
            name = opts.get(key)
            if name is not None:
                if name not in header:
                    raise ValueError(
                        f"{self.path}: data.{key} {name!r} is not a column{_closest_of(name, header)}; "
                        f"columns: {', '.join(header)}"
                    )
                return header.index(name)
            for candidate in default:
                if candidate in lower:
                    return lower[candidate]
            if required:
                raise ValueError(
                    f"{self.path}: no {key.removesuffix('_column')} column (looked for {', '.join(default)}); "
                    f"columns: {', '.join(header)}; set data.{key}"
                )
            return None

        path_col = column("path_column", PATH_COLUMNS, True)
        split_col = column("split_column", ("split",), False)
        class_columns = opts.get("class_columns")
        label_col = None
        if class_columns is None:
            label_col = column("label_column", LABEL_COLUMNS, opts.get("label_column") is not None)
        if label_col is None:  # one 0/1 column per class: those named, or every other column
            used = {path_col, split_col}
            names = list(class_columns) if class_columns else [h for i, h in enumerate(header) if i not in used]
            unknown = [n for n in names if n not in header]
            if unknown or not names:
                raise ValueError(
                    f"{self.path}: no label column ({', '.join(LABEL_COLUMNS)}) and no class columns"
                    + (f" ({', '.join(unknown)} are not columns)" if unknown else "")
                    + f"; columns: {', '.join(header)}; set data.label_column or data.class_columns"
                )
            class_cols = [header.index(n) for n in names]
        self.multilabel = bool(opts.get("multilabel")) or label_col is None
        separator = opts.get("label_separator")

        problems: list[str] = []
        entries: list[tuple[str, str, list[str] | list[int]]] = []  # (path, split, labels)
        for lineno, row in enumerate(rows[1:], 2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{self.path}:{lineno}"
            if len(row) != len(header):
                problems.append(f"{where}: {len(row)} fields, the header has {len(header)}")
                continue
            rel = row[path_col].strip()
            if not rel:
                problems.append(f"{where}: empty {header[path_col]!r}")
                continue
            if not (self.root / rel).is_file():
                problems.append(f"{where}: image {rel!r} not found (looked for {self.root / rel})")
            row_split = "train"
            if split_col is not None:
                value = row[split_col].strip().lower()
                row_split = SPLIT_ALIASES.get(value, "")
                if not row_split:
                    problems.append(
                        f"{where}: unknown split {row[split_col]!r} in column {header[split_col]!r} "
                        f"(expected train, val, valid, validation or test)"
                    )
            if label_col is not None:
                cell = row[label_col].strip()
                labels = _split_labels(cell, separator) if self.multilabel else [cell] if cell else []
                if not labels:
                    problems.append(f"{where}: empty label in column {header[label_col]!r}")
            else:
                bad = [header[c] for c in class_cols if row[c].strip() not in ("0", "1", "0.0", "1.0")]
                if bad:
                    shown = ", ".join(f"{c}={row[header.index(c)]!r}" for c in bad)
                    problems.append(f"{where}: class columns must hold 0 or 1, got {shown}")
                labels = [k for k, c in enumerate(class_cols) if row[c].strip() in ("1", "1.0")]
            entries.append((str(self.root / rel), row_split, labels))
        if problems:
            shown = "\n".join(f"  {p}" for p in problems[:50])
            more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 50 else ""
            raise ValueError(f"{self.path}: {len(problems)} bad row(s):\n{shown}{more}")
        if label_col is None:
            self.classes = [header[c] for c in class_cols]
            index = {name: k for k, name in enumerate(self.classes)}
            entries = [(p, sp, [self.classes[k] for k in labels]) for p, sp, labels in entries]
        else:
            self.classes = sorted({name for _, _, labels in entries for name in labels})
            index = {name: k for k, name in enumerate(self.classes)}
        self.has_splits, self.split = split_col is not None, split
        chosen = [e for e in entries if split is None or e[1] == split]
        if not chosen:
            present = sorted({e[1] for e in entries})
            raise ValueError(
                f"{self.path} has no rows of split {split!r} (its splits: {', '.join(present)}); "
                "set data.val_fraction to cut a validation split from the training rows"
            )
        self.label_sets = [sorted(index[name] for name in labels) for _, _, labels in chosen]
        self.samples = [(p, ls[0] if not self.multilabel else -1) for (p, _, _), ls in zip(chosen, self.label_sets)]

    @property
    def targets(self) -> list[int]:
        if self.multilabel:
            raise AttributeError("a multi-label listing has label_sets, not targets")
        return [label for _, label in self.samples]

    def target(self, index: int):
        return multi_hot(self.label_sets[index], len(self.classes)) if self.multilabel else self.samples[index][1]

    def select(self, indices: Sequence[int]) -> None:
        super().select(indices)
        self.label_sets = [self.label_sets[i] for i in indices]

    def cache_key(self) -> str:
        return hashlib.sha1((super().cache_key() + repr(self.label_sets)).encode()).hexdigest()


def _split_labels(cell: str, separator: str | None) -> list[str]:
    if separator is None:
        separator = next((s for s in ";|," if s in cell), None)
    parts = cell.split(separator) if separator else cell.split()
    return sorted({p.strip() for p in parts if p.strip()})


def _closest_of(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CIFAR(torch.utils.data.Dataset):
    """CIFAR-10 or CIFAR-100 in the official python layout (pickled batches), held in memory as uint8 (N, 32, 32, 3).

    `root` is the folder holding `cifar-10-batches-py/` (or `cifar-100-python/`), or that folder itself. With
    `download=True` the official archive is fetched and its published MD5 checked.
    """

    SPECS = {
        "cifar10": dict(
            folder="cifar-10-batches-py",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
            train=[f"data_batch_{i}" for i in range(1, 6)],
            test=["test_batch"],
            meta="batches.meta",
            names=b"label_names",
            labels=b"labels",
        ),
        "cifar100": dict(
            folder="cifar-100-python",
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
            train=["train"],
            test=["test"],
            meta="meta",
            names=b"fine_label_names",
            labels=b"fine_labels",
        ),
    }

    def __init__(
        self,
        root: str | os.PathLike,
        name: str = "cifar10",
        split: str = "train",
        transform: Callable | None = None,
        download: bool = False,
        image_size: int | None = None,
    ):
        spec = self.SPECS[name]
        self.name, self.transform, self.image_size = name, transform, image_size
        root = Path(root).expanduser()
        folder = root if root.name == spec["folder"] else root / spec["folder"]
        needed = [folder / f for f in (*spec["train"], *spec["test"], spec["meta"])]
        missing = [p for p in needed if not p.exists()]
        if missing and download:
            self._download(spec, folder.parent)
            missing = [p for p in needed if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{name} not found: {missing[0]} does not exist. Put the official python-version files there "
                f"(extract {spec['url']} into {folder.parent}) or pass download=True (--download)"
            )
        self.files = [folder / f for f in spec["train" if split == "train" else "test"]]
        meta = self._unpickle(folder / spec["meta"])
        self.classes = [n.decode() if isinstance(n, bytes) else n for n in meta[spec["names"]]]
        data, targets = [], []
        for path in self.files:
            batch = self._unpickle(path)
            try:
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                targets += [int(t) for t in batch[spec["labels"]]]
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path} is not a CIFAR batch in the official format ({e})") from None
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # N, H, W, C
        self.targets = targets
        if len(self.data) != len(self.targets):
            raise ValueError(f"{folder}: {len(self.data)} images but {len(self.targets)} labels")

    @staticmethod
    def _unpickle(path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a readable CIFAR pickle ({e})") from None

    @staticmethod
    def _download(spec: dict, root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(spec["url"], str(root), md5=spec["md5"])
        except (OSError, RuntimeError) as e:  # no network, or a bad MD5
            raise FileNotFoundError(
                f"could not download {spec['url']} ({e}); download it by hand and extract it into {root}"
            ) from None

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, indices: Sequence[int]) -> None:
        """Keep only these samples, in this order (a subset)."""
        self.data = self.data[list(indices)]
        self.targets = [self.targets[i] for i in indices]
        self.files_selection = tuple(indices)

    def load(self, index: int) -> torch.Tensor:
        img = torch.from_numpy(self.data[index]).permute(2, 0, 1).contiguous()
        if self.image_size and self.image_size != 32:
            from torchvision.transforms.v2 import functional as F

            img = F.resize(img, [self.image_size, self.image_size], antialias=True)
        return img

    def __getitem__(self, index: int):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def cache_key(self) -> str:
        h = hashlib.sha1(self.name.encode())
        for path in self.files:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(repr((self.image_size, getattr(self, "files_selection", None))).encode())
        return h.hexdigest()

    def uint8_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as uint8 (N, 3, H, W) and labels: no decoding needed."""
        images = torch.from_numpy(self.data).permute(0, 3, 1, 2).contiguous()
        if self.image_size and self.image_size != 32:
            images = (
                torch.nn.functional.interpolate(images.float(), size=self.image_size, mode="bilinear", antialias=True)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return images, torch.tensor(self.targets, dtype=torch.int64)


class CUB200(_FileDataset):
    """CUB-200-2011 in its official layout, with the official train/test split.

    `root` is the CUB_200_2011 folder (holding images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
    bounding_boxes.txt, images/) or its parent. `.samples` is [(path, label)], `.boxes` a float tensor (N, 4) of
    x, y, width, height in pixels; `crop_to_box` crops each image to its bird.
    """

    FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        crop_to_box: bool = False,
        transform: Callable | None = None,
        *,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_size: int | None = None,
    ):
        super().__init__(transform, strict, max_pixels, image_size)
        root = Path(root)
        if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
            root = root / "CUB_200_2011"
        if not root.is_dir():
            raise FileNotFoundError(f"CUB-200-2011 folder {root} does not exist")
        for name in self.FILES:
            if not (root / name).is_file():
                raise FileNotFoundError(
                    f"CUB-200-2011: {root / name} does not exist (expected the official layout: "
                    f"{', '.join(self.FILES)}, images/)"
                )
        self.root, self.crop_to_box = root, crop_to_box
        images = self._table("images.txt", 1)
        labels = self._table("image_class_labels.txt", 1)
        is_train = self._table("train_test_split.txt", 1)
        boxes = self._table("bounding_boxes.txt", 4)
        class_rows = self._table("classes.txt", 1)
        class_ids = sorted(class_rows, key=int)
        # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
        self.classes = [class_rows[c][0].split(".", 1)[-1] for c in class_ids]
        label_of = {c: i for i, c in enumerate(class_ids)}
        want = "1" if split == "train" else "0"
        self.samples, box_list, self.image_ids = [], [], []
        for image_id in sorted(images, key=int):
            for table, name in (
                (labels, "image_class_labels.txt"),
                (is_train, "train_test_split.txt"),
                (boxes, "bounding_boxes.txt"),
            ):
                if image_id not in table:
                    raise ValueError(f"CUB-200-2011: image id {image_id} of images.txt has no row in {root / name}")
            if is_train[image_id][0] != want:
                continue
            path = root / "images" / images[image_id][0]
            if not path.is_file():
                raise FileNotFoundError(f"CUB-200-2011: {path} (images.txt row {image_id}) does not exist")
            class_id = labels[image_id][0]
            if class_id not in label_of:
                raise ValueError(f"CUB-200-2011: image {image_id} has class {class_id}, not in {root / 'classes.txt'}")
            self.samples.append((str(path), label_of[class_id]))
            box_list.append([float(v) for v in boxes[image_id]])
            self.image_ids.append(int(image_id))
        self.boxes = torch.tensor(box_list, dtype=torch.float32).reshape(-1, 4)

    def _table(self, name: str, width: int) -> dict[str, list[str]]:
        rows = {}
        path = self.root / name
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != width + 1:
                raise ValueError(f"{path}:{lineno}: expected {width + 1} fields, got {len(parts)}: {line!r}")
            rows[parts[0]] = parts[1:]
        return rows

    def _box(self, index: int) -> tuple[int, int, int, int] | None:
        if not self.crop_to_box:
            return None
        # Boxes are x, y, width, height in pixels; crops beyond the image are clipped by the tensor slicing.
        x, y, w, h = self.boxes[index].tolist()
        return max(0, int(y)), max(0, int(x)), max(1, round(h)), max(1, round(w))

    def cache_key(self) -> str:
        return hashlib.sha1((super().cache_key() + repr(self.crop_to_box)).encode()).hexdigest()


class Shapes(torch.utils.data.Dataset):
    """The built-in shapes dataset (see `synthetic.py`). Single samples are rendered on demand; `.masks` and the
    fast pipeline render the whole split once. `.masks` (N, H, W) gives each pixel's class index + 1 on the shape,
    0 on the background."""

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        num_samples: int | None = None,
        seed: int = 0,
        transform: Callable | None = None,
    ):
        from resnetkit.data.synthetic import SHAPE_CLASSES, shape_labels

        self.split = "train" if split == "train" else "test"
        self.image_size, self.seed, self.transform = image_size, seed, transform
        self.num_samples = SHAPES_SIZES[self.split] if num_samples is None else num_samples
        self.classes = list(SHAPE_CLASSES)
        self.targets = shape_labels(self.num_samples, seed, self.split).tolist()
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _render(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            from resnetkit.data.synthetic import render_shapes

            self._tensors = render_shapes(self.num_samples, self.image_size, self.seed, self.split)
        return self._tensors

    @property
    def masks(self) -> torch.Tensor:
        return self._render()[2]

    def __len__(self) -> int:
        return self.num_samples

    def select(self, indices: Sequence[int]) -> None:
        """Keep only these samples, in this order (a subset): the split is rendered once, then indexed."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        images, labels, masks = self._render()
        self._tensors = (images[index], labels[index], masks[index])
        self.targets = [self.targets[i] for i in indices]
        self.num_samples = len(index)
        self.selection = tuple(indices)

    def load(self, index: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[0][index]
        from resnetkit.data.synthetic import render_shape

        if not 0 <= index < self.num_samples:
            raise IndexError(f"shapes {self.split}: index {index} out of range ({self.num_samples} images)")
        image, _ = render_shape(index, self.targets[index], self.image_size, self.seed, self.split)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def cache_key(self) -> str:
        from resnetkit.data.synthetic import GENERATOR_VERSION

        key = f"shapes-v{GENERATOR_VERSION}-{self.split}-{self.num_samples}-{self.image_size}-{self.seed}"
        selection = getattr(self, "selection", None)
        return key if selection is None else f"{key}-{hashlib.sha1(repr(selection).encode()).hexdigest()[:12]}"

    def uint8_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _ = self._render()
        return images, labels


def multi_hot(label_set: Sequence[int], num_classes: int) -> torch.Tensor:
    """A float32 (C,) row with 1 at each class index of `label_set`."""
    row = torch.zeros(num_classes, dtype=torch.float32)
    row[list(label_set)] = 1.0
    return row


class ShapesMulti(torch.utils.data.Dataset):
    """`shapes-multi`: 1 to 4 built-in shapes of different classes per image (see `synthetic.multi_layout`), for
    multi-label classification, detection and segmentation alike. Items are (uint8 (3, H, W), float32 multi-hot
    (C,)); `boxes(i)` (K, 4) xyxy pixels, `box_labels(i)` (K,) class indices and `mask(i)` (H, W) int64 (class + 1,
    0 background) describe the same shapes. Everything is deterministic from (seed, split, index)."""

    multilabel = True

    def __init__(
        self,
        split: str = "train",
        image_size: int = 64,
        num_samples: int | None = None,
        seed: int = 0,
        transform: Callable | None = None,
    ):
        from resnetkit.data.synthetic import SHAPE_CLASSES, multi_layout

        self.split, self.image_size, self.seed, self.transform = split, image_size, seed, transform
        self.num_samples = SHAPES_MULTI_SIZES[split] if num_samples is None else num_samples
        self.classes = list(SHAPE_CLASSES)
        self.indices = list(range(self.num_samples))  # the images of the split this dataset holds, in order
        self.layouts = [multi_layout(i, seed, split) for i in self.indices]
        self.label_sets = [sorted(shape[0] for shape in layout) for layout in self.layouts]

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, indices: Sequence[int]) -> None:
        """Keep only these samples, in this order (a subset)."""
        self.indices = [self.indices[i] for i in indices]
        self.layouts = [self.layouts[i] for i in indices]
        self.label_sets = [self.label_sets[i] for i in indices]

    def _render(self, index: int):
        if not 0 <= index < len(self.indices):
            raise IndexError(f"shapes-multi {self.split}: index {index} out of range ({len(self.indices)} images)")
        return _render_multi_cached(self.indices[index], self.image_size, self.seed, self.split)

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._render(index)[0].copy()).permute(2, 0, 1).contiguous()

    def boxes(self, index: int) -> torch.Tensor:
        from resnetkit.data.synthetic import multi_boxes

        return torch.from_numpy(multi_boxes(self.layouts[index], self.image_size))

    def box_labels(self, index: int) -> torch.Tensor:
        return torch.tensor([shape[0] for shape in self.layouts[index]], dtype=torch.int64)

    def mask(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._render(index)[3].copy())

    def target(self, index: int) -> torch.Tensor:
        return multi_hot(self.label_sets[index], len(self.classes))

    def __getitem__(self, index: int):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.target(index)

    def cache_key(self) -> str:
        from resnetkit.data.synthetic import GENERATOR_VERSION

        chosen = hashlib.sha1(repr(self.indices).encode()).hexdigest()[:12]
        return f"shapes-multi-v{GENERATOR_VERSION}-{self.split}-{self.image_size}-{self.seed}-{chosen}"

    def uint8_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as uint8 (N, 3, H, W) and their multi-hot rows (N, C)."""
        images = torch.stack([self.load(i) for i in range(len(self))])
        return images, torch.stack([self.target(i) for i in range(len(self))])


@functools.lru_cache(maxsize=64)
def _render_multi_cached(index: int, image_size: int, seed: int, split: str):
    """One rendering serves an item's image and its mask (a task asks for both); callers copy what they keep."""
    from resnetkit.data.synthetic import render_multi

    return render_multi(index, image_size, seed, split)


class CifarMosaic(torch.utils.data.Dataset):
    """2 x 2 mosaics of real CIFAR-10 images (a cifar10-jpg tree: train/<class>/*.jpg, test/<class>/*.jpg), labelled
    with the set of their tiles' classes: a multi-label dataset of real photos. Training mosaics are cut from the
    train split, val and test mosaics from the test split (as `build_dataset` reads val of that tree).

    Mosaic i takes the tiles 4i .. 4i+3 of a seeded permutation of the source images (a fresh permutation each time
    the images run out), so each image is used once per len(source) // 4 mosaics. Items are (uint8 (3, 64, 64) or
    image_size, float32 multi-hot (C,)); tiles are read by the one decoder (through the ImageFolder).
    """

    multilabel = True
    TILE = 32

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        num_samples: int | None = None,
        seed: int = 0,
        transform: Callable | None = None,
        *,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_size: int | None = None,
    ):
        self.root, self.split, self.seed, self.transform = Path(root), split, seed, transform
        train = self.root / "train"  # every split's labels in the training split's class order
        classes = sorted(e.name for e in os.scandir(train) if e.is_dir()) if train.is_dir() else None
        self.source = ImageFolder(split_folder(self.root, split), classes=classes, strict=True, max_pixels=max_pixels)
        self.strict = strict
        self.classes = list(self.source.classes)
        self.image_size = image_size or 2 * self.TILE
        n_source = len(self.source)
        if n_source < 4:
            raise ValueError(f"{self.source.root}: a mosaic needs at least 4 images, found {n_source}")
        self.num_samples = n_source // 4 if num_samples is None else num_samples
        stream = 0 if split == "train" else 1  # val and test are both the test split's mosaics
        perms: dict[int, np.ndarray] = {}
        tiles = np.empty((self.num_samples, 4), dtype=np.int64)
        for i in range(self.num_samples):
            for k in range(4):
                p, j = divmod(4 * i + k, n_source)
                if p not in perms:
                    perms[p] = np.random.default_rng([seed, stream, p]).permutation(n_source)
                tiles[i, k] = perms[p][j]
        self.tiles = tiles.tolist()
        self.label_sets = [sorted({self.source.samples[t][1] for t in row}) for row in self.tiles]

    def __len__(self) -> int:
        return len(self.tiles)

    def select(self, indices: Sequence[int]) -> None:
        """Keep only these samples, in this order (a subset)."""
        self.tiles = [self.tiles[i] for i in indices]
        self.label_sets = [self.label_sets[i] for i in indices]

    def paths(self, index: int) -> list[str]:
        return [self.source.samples[t][0] for t in self.tiles[index]]

    def load(self, index: int) -> torch.Tensor:
        """The mosaic (3, H, W): tiles 0 1 over 2 3, each resized to 32 x 32 if it is not; raises BadImageError."""
        from torchvision.transforms.v2 import functional as F

        tiles = []
        for t in self.tiles[index]:
            tile = self.source.load(t)
            if tuple(tile.shape[-2:]) != (self.TILE, self.TILE):
                tile = F.resize(tile, [self.TILE, self.TILE], antialias=True)
            tiles.append(tile)
        img = torch.cat([torch.cat(tiles[:2], 2), torch.cat(tiles[2:], 2)], 1)
        if self.image_size != 2 * self.TILE:
            img = F.resize(img, [self.image_size, self.image_size], antialias=True)
        return img

    def target(self, index: int) -> torch.Tensor:
        return multi_hot(self.label_sets[index], len(self.classes))

    def __getitem__(self, index: int):
        try:
            img = self.load(index)
        except BadImageError as e:
            if self.strict:
                raise
            return SkippedSample(e.path, e.reason)
        return (self.transform(img) if self.transform else img), self.target(index)

    def cache_key(self) -> str:
        h = hashlib.sha1(b"cifar10-mosaic")
        for row in self.tiles:
            for t in row:
                path = self.source.samples[t][0]
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(b"|")
        h.update(repr((self.classes, self.image_size)).encode())
        return h.hexdigest()

    def uint8_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mosaic decoded (threads: the decoder releases the GIL) as uint8 (N, 3, H, W) and multi-hot (N, C)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parallel_decoders()) as pool:
            images = list(pool.map(self.load, range(len(self))))
        return torch.stack(images), torch.stack([self.target(i) for i in range(len(self))])


def stratified_indices(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """n sample indices drawn without replacement, each class keeping its share (largest remainders get the
    leftover places), shuffled with `seed` within each class; returned in ascending order."""
    if n >= len(targets):
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    total = len(targets)
    quota = {c: n * len(ix) / total for c, ix in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (take[c] - quota[c], c))[: n - sum(take.values())]:
        take[c] += 1
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in sorted(by_class):
        ix = by_class[c]
        order = torch.randperm(len(ix), generator=g)[: take[c]].tolist()
        chosen += [ix[k] for k in order]
    return sorted(chosen)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in the standard index order (torchvision's ImageNet weights)."""
    from importlib import resources

    text = resources.files("resnetkit.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def default_root() -> Path:
    """Where named datasets (cifar10, cifar100, cub200) live unless given a root: $RESNETKIT_DATA or
    ~/.cache/resnetkit/data."""
    return Path(os.environ.get("RESNETKIT_DATA", "~/.cache/resnetkit/data")).expanduser()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    return split


def detect_kind(path: Path) -> str:
    """What a dataset folder holds: 'cub200', 'cifar10', 'cifar100' or 'folder' (an ImageFolder root)."""
    if (path / "images.txt").is_file() or (path / "CUB_200_2011" / "images.txt").is_file():
        return "cub200"
    if path.name == "cifar-10-batches-py" or (path / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if path.name == "cifar-100-python" or (path / "cifar-100-python").is_dir():
        return "cifar100"
    return "folder"


def split_folder(root: Path, split: str) -> Path:
    """The folder of an ImageFolder root holding `split`: train/, and val/ or test/ for evaluation."""
    names = ["train"] if split == "train" else [split, "test" if split == "val" else "val"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    if is_flat_folder(root):
        raise FileNotFoundError(
            f"{root} is a folder of class folders without a split (no {' or '.join(n + '/' for n in names)} "
            "folder): set data.val_fraction (e.g. --set data.val_fraction=0.2, and data.test_fraction for a test "
            "split) to split it, stratified and seeded; the lists are written to the run folder"
        )
    raise FileNotFoundError(
        f"{root} has no {' or '.join(n + '/' for n in names)} folder (an image folder dataset "
        f"holds train/<class>/<image> and val/<class>/<image> or test/<class>/<image>)"
    )


def is_flat_folder(root: Path) -> bool:
    """root/<class>/<image> with no train/ folder: the classes are the folders themselves."""
    if (root / "train").is_dir() or not root.is_dir():
        return False
    for entry in os.scandir(root):
        if entry.is_dir() and not entry.name.startswith("."):
            return any(os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES for f in os.scandir(entry.path))
    return False


def read_list(folder: str | os.PathLike, split: str) -> tuple[Path, list[str]]:
    """The split list <folder>/<split>.txt: its path and its names (paths relative to the dataset)."""
    path = Path(folder) / f"{split}.txt"
    if not path.is_file():
        made = sorted(p.stem for p in Path(folder).glob("*.txt"))
        hint = " (set data.test_fraction for a test split, or evaluate --split val)" if split == "test" else ""
        raise FileNotFoundError(
            f"{path} does not exist: the split lists in {folder} hold {', '.join(made) or 'nothing'}{hint}"
        )
    return path, [line for line in path.read_text().splitlines() if line.strip()]


def select_listed(dataset, folder: str | os.PathLike, split: str) -> None:
    """Keep the dataset's items named in <folder>/<split>.txt (split lists, see `resnetkit.data.splits`), in its
    order; names it lacks are one error."""
    path, listed = read_list(folder, split)
    index = {name: i for i, name in enumerate(dataset.relative_paths())}
    missing = [(lineno, name) for lineno, name in enumerate(listed, 1) if name not in index]
    if missing:
        shown = "\n".join(f"  {path}:{lineno}: {name}" for lineno, name in missing[:20])
        more = f"\n  ... ({len(missing)} in all)" if len(missing) > 20 else ""
        raise ValueError(f"{len(missing)} images of the split list {path} are not in the dataset:\n{shown}{more}")
    dataset.select([index[name] for name in listed])
    dataset.listed_split = split


def _mosaic_source(name: str, root: str | os.PathLike | None) -> tuple[Path, int | None]:
    """`cifar10-mosaic:<path>[:N]` (or `cifar10-mosaic[:N]` with root=<path>) -> (the cifar10-jpg tree, N)."""
    rest = name.removeprefix("cifar10-mosaic").removeprefix(":")
    head, _, tail = rest.rpartition(":")
    count = None
    if tail.isdigit():
        rest, count = head, int(tail)
    elif rest.isdigit():
        rest, count = "", int(rest)
    if count is not None and count < 10:
        raise ValueError(f"dataset {name!r}: N must be >= 10 training mosaics, e.g. cifar10-mosaic:PATH:2000")
    if not rest and root is None:
        raise ValueError(
            f"dataset {name!r}: name the cifar10-jpg tree, e.g. cifar10-mosaic:../shared/data/cifar10-jpg (or set root)"
        )
    path = Path(rest or root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: {path} is not a folder (expected a cifar10-jpg tree: train/, test/)"
        )
    return path, count


def build_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    strict: bool = False,
    download: bool = False,
    image_size: int | None = None,
    crop_to_box: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    columns: dict | None = None,
    splits: str | os.PathLike | None = None,
    whole: bool = False,
) -> torch.utils.data.Dataset:
    """A dataset by name (`shapes`, `cifar10`, `cifar100`, `cub200`, looked up under `root`) or by path (an
    ImageFolder root with train/ and val/ or test/, a CUB-200-2011 root, or a CIFAR python-layout folder).

    Multi-label (items carry float32 multi-hot rows, `.multilabel` is True, `.label_sets` lists each item's classes):
    `shapes-multi` (5,000 / 1,000 / 1,000 images of 1-4 shapes, 64 px unless image_size; `shapes-multi:N` has N
    training and N // 5 val and test images; with boxes and masks per item), and `cifar10-mosaic:<cifar10-jpg
    tree>[:N]` (2 x 2 mosaics of the real JPEGs, 64 px; train from train/, val and test from test/).

    `shapes` has 10,000 training and 2,000 test images; `shapes:N` has N training and N // 5 test images (small
    runs and tests). `image_size`: the render size of shapes (default 32); for other datasets, resize the shorter side
    to it. `crop_to_box`: CUB only. Splits: train, val, test (val and test are the same for shapes, CIFAR and CUB).

    A `.csv` or `.tsv` file lists images with their labels (`CsvListing`; `columns` names its columns: path_column,
    label_column, split_column, label_separator, class_columns, multilabel). `splits`: a folder of split lists
    (<split>.txt, paths relative to the dataset, as `resnetkit.data.splits` writes them for data.val_fraction and
    train --folds): the split is the listed images, in order; a split without a list is the dataset's own. `whole`:
    the collection such lists are cut from (a flat folder of class folders: every image; otherwise the train split).
    """
    split = _check_split(split)
    name = str(name_or_path)
    if splits is not None:
        options = dict(root=root, transform=transform, strict=strict, download=download, image_size=image_size)
        options.update(crop_to_box=crop_to_box, max_pixels=max_pixels, columns=columns)
        if (Path(splits) / f"{split}.txt").is_file():
            dataset = build_dataset(name, "train", whole=True, **options)
            select_listed(dataset, splits, split)
            return dataset
        try:
            return build_dataset(name, split, **options)
        except (FileNotFoundError, ValueError):  # the dataset has no such split of its own either
            read_list(splits, split)  # raises, naming the lists there are
            raise
    if columns and not name.lower().endswith((".csv", ".tsv")):
        used = [k for k in CSV_COLUMN_KEYS if columns.get(k) is not None]
        if used:
            raise ValueError(f"data.{used[0]} applies to a .csv or .tsv listing, not to {name}")
    if name == "shapes-multi" or name.startswith("shapes-multi:"):
        count = name.partition(":")[2]
        if count and not (count.isdigit() and int(count) >= 10):
            raise ValueError(
                f"dataset {name!r}: write shapes-multi:N with N >= 10 training images, e.g. shapes-multi:2000"
            )
        num = None if not count else int(count) if split == "train" else max(10, int(count) // 5)
        return ShapesMulti(split, image_size or 64, num_samples=num, transform=transform)
    if name == "cifar10-mosaic" or name.startswith("cifar10-mosaic:"):
        source, num = _mosaic_source(name, root)
        if num is not None and split != "train":
            num = max(10, num // 5)
        return CifarMosaic(
            source, split, num, transform=transform, strict=strict, max_pixels=max_pixels, image_size=image_size
        )
    if name == "shapes" or name.startswith("shapes:"):
        count = name.partition(":")[2]
        if count and not (count.isdigit() and int(count) >= 10):
            raise ValueError(f"dataset {name!r}: write shapes:N with N >= 10 training images, e.g. shapes:2000")
        num = None if not count else int(count) if split == "train" else max(10, int(count) // 5)
        return Shapes(split, image_size or 32, num_samples=num, transform=transform)
    if name in BUILTIN:
        path, kind = Path(root).expanduser() if root else default_root() / name, name
        if kind == "cub200" and not path.exists():
            raise FileNotFoundError(
                f"CUB-200-2011 not found at {path}: download CUB_200_2011.tgz from "
                "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it there, or "
                "pass its path"
            )
    else:
        path = Path(name).expanduser()
        if not path.exists():
            close = difflib.get_close_matches(name, BUILTIN, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FileNotFoundError(
                f"dataset path {path} does not exist and is not a built-in dataset name ({', '.join(BUILTIN)}){hint}"
            )
        if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
            return CsvListing(
                path, split, transform, columns=columns, strict=strict, max_pixels=max_pixels, image_size=image_size
            )
        if not path.is_dir():
            raise ValueError(f"dataset path {path} is a file; expected a folder, or a .csv or .tsv listing")
        kind = detect_kind(path)
    if crop_to_box and kind != "cub200":
        raise ValueError(f"crop_to_box applies to CUB-200-2011 only, not to {name}")
    if kind in ("cifar10", "cifar100"):
        return CIFAR(path, kind, split, transform, download, image_size)
    if kind == "cub200":
        return CUB200(path, split, crop_to_box, transform, strict=strict, max_pixels=max_pixels, image_size=image_size)
    if whole and is_flat_folder(path):
        return ImageFolder(path, transform, strict=strict, max_pixels=max_pixels, image_size=image_size)
    classes = None
    if split != "train" and (path / "train").is_dir():
        classes = sorted(e.name for e in os.scandir(path / "train") if e.is_dir() and not e.name.startswith("."))
    return ImageFolder(
        split_folder(path, split),
        transform,
        classes=classes,
        strict=strict,
        max_pixels=max_pixels,
        image_size=image_size,
    )
