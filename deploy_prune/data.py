"""Datasets: local Fashion-MNIST (IDX files), scikit-learn digits, CIFAR-10 and ImageFolder.

Small datasets live in memory as tensors and are served by :class:`TensorLoader`, which is much
faster on a CPU than a per-item ``DataLoader``. Splits and shuffles are deterministic by seed.

Data order is a pure function of (seed, stream, epoch). The stages of a job read one stream,
the training data's, each from the epoch its predecessors end at as the config implies
(:func:`deploy_prune.pipeline.first_epochs`); nothing is carried in a counter, so a stage gives
the same batches whichever command or process runs it, and a resumed stage can start again at
any step (:func:`epoch_batches`). Steps inside a stage that need their own data (RBP's per-node
passes, layer-by-layer recovery) take named streams (:meth:`TensorLoader.for_stage`).
"""

from __future__ import annotations

import gzip
import itertools
import logging
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deploy_prune import distributed
from deploy_prune._registry import Registry
from deploy_prune.config import DataConfig
from deploy_prune.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, resolve

log = logging.getLogger(__name__)

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEFAULT_CACHE = Path.home() / ".cache" / "deploy_prune"


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message says how to get it."""


@dataclass
class DataBundle:
    """Train/val/test splits plus what a model needs to know about the inputs."""

    name: str
    train: Dataset | TensorLoader
    val: Dataset | TensorLoader
    test: Dataset | TensorLoader
    num_classes: int
    in_channels: int
    image_size: int
    preprocess: Preprocess | None = None  # the evaluation transform the splits went through

    def example(self, batch: int = 2) -> torch.Tensor:
        """A zero input of the right shape, (B, C, H, W)."""
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)


def stream_seed(seed: int, stream: str, epoch: int) -> int:
    """The shuffle seed of one epoch of a data stream (stable across processes and versions).

    The training data's own stream (``""``) keeps the seeds it always had, so committed results
    reproduce; named streams mix in a CRC of the name.
    """
    if not stream:
        return seed * 100003 + epoch
    return (seed * 1_000_003 + zlib.crc32(stream.encode()) * 10_007 + epoch) % (2**63 - 1)


class TensorLoader:
    """Batches over in-memory tensors; epoch ``e`` of stream ``s`` is shuffled from (seed, s, e)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        sampler_rank: int = 0,
        sampler_world: int = 1,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stream: str = "",
        first_epoch: int = 0,
    ) -> None:
        self.x, self.y = x, y  # (N, C, H, W) float, (N,) long
        self.transform = transform  # per batch, after augmentation (resize/channels/normalise)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.stream = stream
        self.first_epoch = first_epoch  # epoch e of this loader is epoch first_epoch + e of its stream
        self.epoch = 0  # only plain iteration (``for xb, yb in loader``) advances it
        self.rank, self.world = sampler_rank, sampler_world

    def with_options(self, **kw) -> TensorLoader:
        opts = dict(batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed,
                    augment=self.augment, sampler_rank=self.rank, sampler_world=self.world,
                    transform=self.transform, stream=self.stream, first_epoch=self.first_epoch)
        opts.update(kw)
        return TensorLoader(self.x, self.y, **opts)

    def for_stage(self, name: str) -> TensorLoader:
        """The same data under its own stream ``<stream>/<name>``, from epoch 0."""
        return self.with_options(stream=f"{self.stream}/{name}" if self.stream else name, first_epoch=0)

    def __len__(self) -> int:
        n = len(self.y)
        return (n + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def _indices(self, epoch: int) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, epoch))
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def epoch_batches(self, epoch: int, *, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch``; no state is read or changed."""
        epoch += self.first_epoch
        idx = self._indices(epoch)
        for i in range(start * self.batch_size, len(idx), self.batch_size):
            # data-parallel: each rank takes its strided slice of the same global batch
            j = idx[i : i + self.batch_size][self.rank :: self.world]
            xb = self.x[j]
            if self.augment:
                xb = _augment(xb, seed=self._augment_seed(epoch, i))
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, self.y[j]

    def _augment_seed(self, epoch: int, offset: int) -> int:
        if not self.stream:  # the seeds the training stream always had
            return self.seed * 7919 + (epoch + 1) * 131 + offset
        return stream_seed(self.seed, self.stream, epoch) * 131 + offset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)


def stage_loader(loader, stage: str | None = None, *, batch_size: int | None = None, first_epoch: int = 0):
    """``loader`` for one stage: the training stream from ``first_epoch`` (``stage=None``), or a
    named stream of its own (``stage``), optionally re-batched."""
    if isinstance(loader, TensorLoader):
        out = loader.for_stage(stage) if stage else loader.with_options(first_epoch=first_epoch)
        return out.with_options(batch_size=batch_size) if batch_size else out
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, torch.utils.data.RandomSampler):
        out = DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size, shuffle=True,
                         generator=torch.Generator(), num_workers=loader.num_workers,
                         pin_memory=loader.pin_memory)
        out.stream_seed_base = getattr(loader, "stream_seed_base", 0)
        out.stream = f"{getattr(loader, 'stream', '')}/{stage}" if stage else getattr(loader, "stream", "")
        out.first_epoch = 0 if stage else first_epoch
        return out
    return loader


def epoch_batches(loader, epoch: int, *, start: int = 0) -> Iterator:
    """Batch ``start`` onwards of epoch ``epoch`` of ``loader``, the same in every process.

    A :class:`TensorLoader` computes it directly; a ``DataLoader`` is re-seeded for the epoch
    (shuffled ones) or told its epoch (``DistributedSampler``) and skips ``start`` batches.
    """
    if isinstance(loader, TensorLoader):
        return loader.epoch_batches(epoch, start=start)
    epoch += getattr(loader, "first_epoch", 0)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(stream_seed(getattr(loader, "stream_seed_base", 0),
                                                 getattr(loader, "stream", ""), epoch))
    return itertools.islice(iter(loader), start, None)


def _augment(x: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Random horizontal flip and 4-pixel shifted crop, on a (B, C, H, W) batch."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


class DataError(ValueError):
    """A data file is corrupt, truncated, or holds labels out of range; the message names it."""


MAX_IDX_BYTES = 2 << 30  # a decompressed IDX file larger than this is refused (a gzip bomb)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; a corrupt or truncated file is
    one :class:`DataError` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated data file ({type(e).__name__}: {e})") from None
    if len(data) > MAX_IDX_BYTES:
        raise DataError(f"{path}: larger than {MAX_IDX_BYTES} bytes; not a dataset file deploy-prune reads")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (corrupt header)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or corrupt IDX file (header says {dims}, "
                        f"{arr.size} values follow)")
    return arr.reshape(dims)


def check_labels(y: np.ndarray, num_classes: int, source: str | Path) -> None:
    """Labels must lie in [0, num_classes): one bad label would silently add classes."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise DataError(f"{source}: {bad.size} label(s) out of range [0, {num_classes}) "
                        f"(e.g. {int(bad[0])}); corrupt label file?")


def _find_idx(root: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            p = root / sub / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def find_fashion_mnist(root: str | Path | None) -> Path | None:
    """The folder holding the four Fashion-MNIST IDX files, or None. A given ``root`` is the
    only place looked at: no silent fallback to another copy."""
    candidates = [Path(root)] if root else [FASHION_SYSTEM_DIR, DEFAULT_CACHE / "fashion_mnist"]
    for c in candidates:
        if all(_find_idx(c, s) for s in FASHION_FILES.values()):
            return c
    return None


def _unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True)).float().div_(255.0)  # (N, C, H, W) in [0, 1]


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _cap(x: torch.Tensor, y: torch.Tensor, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (x[:cap], y[:cap]) if cap else (x, y)


def _bundle_from_arrays(
    name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
    *, cfg: DataConfig, seed: int, mean: list[float], std: list[float], augment: bool,
) -> DataBundle:
    pre = resolve(cfg, size=xtr.shape[2], channels=xtr.shape[1], mean=mean, std=std, crop=False)
    tf = pre.tensor_transform()
    # at the native size the whole split is transformed once; a resize runs per batch (memory)
    lazy = pre.resize is not None or pre.input_size != xtr.shape[2] or pre.input_size != xtr.shape[3]
    prep = _unit if lazy else (lambda a: tf(_unit(a)))
    x_all, y_all = prep(xtr), torch.from_numpy(ytr.astype(np.int64))
    tr, va = _split(len(y_all), cfg.val_fraction, seed)
    xt, yt = _cap(x_all[tr], y_all[tr], cfg.max_train_samples)
    xv, yv = _cap(x_all[va], y_all[va], cfg.max_eval_samples)
    xe, ye = _cap(prep(xte), torch.from_numpy(yte.astype(np.int64)), cfg.max_eval_samples)
    bs, ebs, batch_tf = cfg.batch_size, cfg.eval_batch_size, tf if lazy else None
    return DataBundle(
        name=name,
        train=TensorLoader(xt, yt, batch_size=bs, shuffle=True, seed=seed, augment=augment, transform=batch_tf),
        val=TensorLoader(xv, yv, batch_size=ebs, transform=batch_tf),
        test=TensorLoader(xe, ye, batch_size=ebs, transform=batch_tf),
        num_classes=int(y_all.max()) + 1,
        in_channels=pre.channels,
        image_size=pre.input_size,
        preprocess=pre,
    )


def load_fashion_mnist(cfg: DataConfig, *, seed: int) -> DataBundle:
    folder = find_fashion_mnist(cfg.root)
    if folder is None and cfg.download:
        import torchvision

        root = Path(cfg.root) if cfg.root else DEFAULT_CACHE / "fashion_mnist"
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        folder = find_fashion_mnist(root)
    if folder is None and cfg.root:
        raise DataNotFoundError(
            f"Fashion-MNIST not found under data.root / --data-root {cfg.root} (expected "
            f"{', '.join(FASHION_FILES.values())}, optionally .gz); not falling back to another copy")
    if folder is None:
        raise DataNotFoundError(
            "Fashion-MNIST not found (looked in --data-root / data.root, "
            f"{FASHION_SYSTEM_DIR} and {DEFAULT_CACHE / 'fashion_mnist'}). Get it with "
            "'apt-get install -y dataset-fashion-mnist', or pass data.download=true on a "
            "machine with a network."
        )
    files = {k: _find_idx(folder, s) for k, s in FASHION_FILES.items()}
    arr = {k: _read_idx(f) for k, f in files.items()}
    for split in ("train", "test"):
        images, labels = arr[f"{split}_images"], arr[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{files[f'{split}_images']} and {files[f'{split}_labels']}: shapes "
                            f"{images.shape} and {labels.shape} do not pair up as images and labels")
        check_labels(labels, 10, files[f"{split}_labels"])
    log.info("Fashion-MNIST from %s", folder)
    return _bundle_from_arrays(
        "fashion_mnist", arr["train_images"][:, None], arr["train_labels"],
        arr["test_images"][:, None], arr["test_labels"],
        cfg=cfg, seed=seed, mean=[0.2860], std=[0.3530], augment=cfg.augment,
    )


def load_digits(cfg: DataConfig, *, seed: int) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images), 20% held out as the test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = d.target
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return _bundle_from_arrays(
        "digits", x[tr], y[tr], x[te], y[te],
        cfg=cfg, seed=seed, mean=[0.3], std=[0.4], augment=cfg.augment,
    )


def load_cifar10(cfg: DataConfig, *, seed: int) -> DataBundle:
    import torchvision

    root = Path(cfg.root) if cfg.root else DEFAULT_CACHE / "cifar10"
    try:
        tr = torchvision.datasets.CIFAR10(str(root), train=True, download=cfg.download)
        te = torchvision.datasets.CIFAR10(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataNotFoundError(
            f"CIFAR-10 not found under {root} ({e}). Pass data.root=DIR holding "
            "cifar-10-batches-py, or data.download=true on a machine with a network."
        ) from None
    except (EOFError, OSError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as e:
        raise DataError(f"{root / 'cifar-10-batches-py'}: corrupt or truncated CIFAR-10 batch file "
                        f"({type(e).__name__})") from None
    check_labels(np.asarray(tr.targets), 10, root / "cifar-10-batches-py")
    check_labels(np.asarray(te.targets), 10, root / "cifar-10-batches-py")
    to_nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731  (N, H, W, C) -> (N, C, H, W)
    return _bundle_from_arrays(
        "cifar10", to_nchw(tr.data), np.asarray(tr.targets), to_nchw(te.data), np.asarray(te.targets),
        cfg=cfg, seed=seed, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616],
        augment=cfg.augment,
    )


def load_imagefolder(cfg: DataConfig, *, seed: int) -> DataBundle:
    """ImageNet-style tree: ROOT/train/CLASS/*.JPEG and ROOT/val/CLASS/*.JPEG."""
    from torchvision.datasets import ImageFolder

    if not cfg.root:
        raise DataNotFoundError("data.name=imagefolder needs data.root=DIR with train/ and val/ folders")
    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataNotFoundError(f"ImageFolder split not found: {root / split}")
    pre = resolve(cfg, size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop=True)
    eval_tf = pre.pil_transform()
    train_tf = _augmented(pre) if cfg.augment else eval_tf
    train = ImageFolder(str(root / "train"), transform=train_tf)
    val = ImageFolder(str(root / "val"), transform=eval_tf)
    if val.classes != train.classes:  # class indices come from the sorted folder names of each split
        odd = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"{root}: train/ and val/ have different class folders ({', '.join(odd[:5])}); "
                         "labels would not line up")
    g = torch.Generator().manual_seed(seed)
    kw = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(_capped(train, cfg.max_train_samples, seed), batch_size=cfg.batch_size,
                              shuffle=True, generator=g, **kw)
    train_loader.stream_seed_base, train_loader.stream = seed, ""
    return DataBundle(
        name="imagefolder",
        train=train_loader,
        val=DataLoader(_capped(val, cfg.max_eval_samples, seed), batch_size=cfg.eval_batch_size, **kw),
        test=DataLoader(_capped(val, cfg.max_eval_samples, seed), batch_size=cfg.eval_batch_size, **kw),
        num_classes=len(train.classes),
        in_channels=pre.channels,
        image_size=pre.input_size,
        preprocess=pre,
    )


def _augmented(pre: Preprocess):
    """Training augmentation for ImageFolder: random resized crop and flip, then the model's own
    channels and normalisation."""
    import torchvision.transforms as T

    gray = [T.Grayscale(1)] if pre.channels == 1 else []
    return T.Compose([T.RandomResizedCrop(pre.input_size), T.RandomHorizontalFlip(), *gray, T.ToTensor(),
                      T.Normalize(list(pre.mean), list(pre.std))])


def _capped(ds: Dataset, cap: int | None, seed: int) -> Dataset:
    if not cap or cap >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:cap]
    return torch.utils.data.Subset(ds, idx.tolist())


# data.name values; config validation checks names against this registry before any work
DATASETS: Registry = Registry("dataset")
for _name, _loader in [("fashion_mnist", load_fashion_mnist), ("digits", load_digits),
                       ("cifar10", load_cifar10), ("imagefolder", load_imagefolder)]:
    DATASETS.register(_name)(_loader)
LOADERS = {name: DATASETS.get(name) for name in DATASETS}


def load_data(cfg: DataConfig, *, seed: int = 0) -> DataBundle:
    """Load the dataset named by ``cfg.name``; under torchrun the training split is sharded."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.root and not Path(cfg.root).is_dir() and not cfg.download:
        raise DataNotFoundError(f"data.root / --data-root {cfg.root}: no such directory")
    bundle = DATASETS.get(cfg.name)(cfg, seed=seed)
    if distributed.active():
        bundle.train = _shard(bundle.train, seed)
    return bundle


def _shard(loader, seed: int):
    if isinstance(loader, TensorLoader):
        return loader.with_options(sampler_rank=distributed.rank(), sampler_world=distributed.world())
    sampler = torch.utils.data.DistributedSampler(loader.dataset, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // distributed.world(), sampler=sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)
