"""Feature networks for FID and the classifier that checks a completed shirt stays a shirt.

FID needs a feature network. Inception-v3 (torch-fidelity's weights, the standard FID) is used where those weights
are on disk: nothing is downloaded at run time. Otherwise, offline, a small CNN classifier is trained once on the
dataset's own training split (deterministic seed) and cached on disk, keyed by the data's fingerprint and the
classifier's settings; its penultimate layer gives the FID features. Either way the network is named in every
report, with the classifier's accuracy on the real test images. The same classifier labels the samples for
`sample_class_acc` (the share of samples it puts in the input's true class).

LPIPS (diversity_lpips) goes through torchmetrics' LearnedPerceptualImagePatchSimilarity only where it can be built
offline: torchvision installed and the backbone's ImageNet weights already in torch.hub's checkpoints dir (the LPIPS
heads ship with torchmetrics). Otherwise it is skipped with the reason, before anything could start a download.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from cgml_lightning.data.base import fingerprint
from cgml_lightning.progress import track

log = logging.getLogger(__name__)

# torch-fidelity's Inception-v3 weights (the file name its loader caches under torch.hub's checkpoints dir)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
ARCHITECTURE = "cnn-bn-pool7-v1"       # part of the cache key: change it when ImageClassifier changes
CLASSIFIER_DEFAULTS = {"width": 16, "feature_dim": 64, "steps": 800, "batch_size": 128, "lr": 3e-3, "seed": 0}
# LPIPS backbones: torchmetrics' net_type -> (torchvision model, its weights enum)
LPIPS_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
                   "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}
LPIPS_MIN_SIDE = 64    # smaller images are resized up to this before LPIPS (the backbones pool them away otherwise)


class ImageClassifier(nn.Module):
    """Small CNN for images [B, C, H, W] in [0, 1]: two conv-batchnorm-pool blocks, pooled to 7x7 (28x28 images
    as they are), a feature layer and a linear head. About 0.88 test accuracy on Fashion-MNIST after 400 steps.
    `features(x)` -> [B, feature_dim] (the FID features); `forward(x)` -> logits [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(),
            nn.Linear(2 * width * 49, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Class per image, [B] on x's device (batched, eval mode, run on the classifier's device)."""
        self.eval()
        device = self.head.weight.device
        return torch.cat([self(chunk.to(device)).argmax(1) for chunk in x.split(batch_size)]).to(x.device)


class ClassifierFeatures(nn.Module):
    """FID feature extractor for torchmetrics: images [B, C, H, W] in [0, 1] -> the classifier's features."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.feature_dim                   # read by torchmetrics (no dummy forward)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.classifier.features(imgs)


class InceptionFeatures(nn.Module):
    """FID feature extractor over torchmetrics' Inception-v3 (2048-d pool features): takes images [B, C, H, W] in
    [0, 1], grey or RGB, and hands Inception the uint8 RGB it expects. `net` replaces Inception (tests)."""

    def __init__(self, weights_path: str | Path | None = None, net: nn.Module | None = None):
        super().__init__()
        if net is None:
            from torchmetrics.image.fid import NoTrainInceptionV3

            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(weights_path))
        self.net = net
        self.num_features = 2048

    def forward(self, imgs: Tensor) -> Tensor:
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        elif imgs.shape[1] != 3:
            raise ValueError(f"Inception features need grey or RGB images [B, 1|3, H, W]; got {tuple(imgs.shape)}")
        return self.net((imgs.clamp(0, 1) * 255).round().to(torch.uint8))


def inception_weights(path: str | Path | None = None) -> Path | None:
    """A local Inception weights file usable by torchmetrics, or None: `path` if given (it must exist), else
    torch-fidelity's file in torch.hub's checkpoints dir. None also when torch-fidelity is not installed."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        if path is not None:
            raise ModuleNotFoundError(f"feature_net.inception_weights_path={path}: Inception FID needs torch-fidelity "
                                      "(pip install torch-fidelity)") from None
        return None
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"feature_net.inception_weights_path: no such file: {Path(path).resolve()}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def labelled_split(datamodule, split: str) -> tuple[Tensor, Tensor]:
    """(clean images y [N, C, H, W], labels [N]) of a datamodule's split; an error if it has no class labels."""
    datamodule.setup()
    data = datamodule.splits[split]
    if getattr(data, "label", None) is None:
        raise ValueError(f"{type(datamodule).__name__} has no class labels (no 'label' in its batches): "
                         "the classifier and the linear probe need them")
    return data.y, data.label


def has_labels(datamodule) -> bool:
    """Whether every split of a datamodule carries class labels."""
    datamodule.setup()
    return all(getattr(s, "label", None) is not None for s in datamodule.splits.values())


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, width: int = 16, feature_dim: int = 64,
                     steps: int = 800, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     device: str | torch.device | None = None) -> ImageClassifier:
    """Adam on cross-entropy for `steps` minibatches drawn (seeded) from images [N, C, H, W] / labels [N], on
    `device` (default CPU); returns the classifier there, in eval mode. The weights are initialised and the rows
    drawn on the CPU with the seed, so the minibatches do not depend on the device and CPU runs repeat exactly.
    Only each minibatch moves to the device, not the whole training split."""
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    net = ImageClassifier(images.shape[1], num_classes, width, feature_dim).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    description = f"classifier: {steps} steps on {len(images)} images ({device})"
    with closing(track(range(steps), description)) as step_range:
        for _ in step_range:
            rows = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
            batch = images[rows].to(device, non_blocking=True)
            loss = F.cross_entropy(net(batch), labels[rows].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval()


def accuracy(classifier: ImageClassifier, images: Tensor, labels: Tensor, num_classes: int) -> float:
    return multiclass_accuracy(classifier.predict(images), labels, num_classes, average="micro").item()


def load_or_train_classifier(datamodule, cache_dir: str | Path, device: str | torch.device | None = None,
                             **settings) -> tuple[ImageClassifier, dict[str, Any]]:
    """The dataset's classifier, from cache_dir when a file for this training split and these settings exists, else
    trained on the training split's clean images y (on `device`) and saved there with CPU tensors, so the file
    loads on any machine. Returns (classifier in eval mode on `device`, default CPU, info) with info
    {"name", "test_acc", "path"}; test_acc on the test split's clean images."""
    unknown = set(settings) - set(CLASSIFIER_DEFAULTS)
    if unknown:
        raise ValueError(f"feature_net.classifier: unknown keys {sorted(unknown)} "
                         f"(known: {sorted(CLASSIFIER_DEFAULTS)})")
    cfg = {**CLASSIFIER_DEFAULTS, **settings}
    train_y, train_labels = labelled_split(datamodule, "train")
    test_y, test_labels = labelled_split(datamodule, "test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    data_key = fingerprint(train_y, train_labels)
    cfg_key = hashlib.sha256(json.dumps({**cfg, "arch": ARCHITECTURE}, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(cache_dir).expanduser() / f"classifier-{data_key}-{cfg_key}.pt"
    arch = {"in_channels": train_y.shape[1], "num_classes": num_classes, "width": cfg["width"],
            "feature_dim": cfg["feature_dim"]}
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier = ImageClassifier(**saved["arch"])
        classifier.load_state_dict(saved["state_dict"])
        classifier.to(device or "cpu").eval()
        log.info("classifier for FID / sample class accuracy: %s", path)
    else:
        log.info("training the feature classifier on the training split (%d images, %d steps on %s; cached in %s)",
                 len(train_y), cfg["steps"], torch.device(device or "cpu"), path)
        classifier = train_classifier(train_y, train_labels, num_classes, cfg["width"], cfg["feature_dim"],
                                      cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["seed"], device)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".pt.part")
        state = {key: value.cpu() for key, value in classifier.state_dict().items()}
        torch.save({"arch": arch, "state_dict": state, "settings": cfg, "data": data_key}, partial)
        partial.replace(path)
    name = (f"cnn-classifier (width {cfg['width']}, {cfg['feature_dim']}-d features, {cfg['steps']} steps on the "
            f"training split of {type(datamodule).__name__}, data {data_key})")
    test_acc = accuracy(classifier, test_y, test_labels, num_classes)
    return classifier, {"name": name, "test_acc": test_acc, "path": str(path)}


# ---- LPIPS (only from files on disk) ---------------------------------------------------------------------------
def has_module(name: str) -> bool:
    """Whether a module can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def lpips_head_file(net: str) -> Path:
    """The LPIPS head weights torchmetrics ships for net (alex, vgg, squeeze)."""
    spec = importlib.util.find_spec("torchmetrics.functional.image.lpips")
    return Path(spec.origin).parent / "lpips_models" / f"{net}.pth"


def lpips_backbone_file(net: str) -> Path:
    """Where torchvision caches the backbone's ImageNet weights: torch.hub's checkpoints dir / the file of its URL.
    Needs torchvision."""
    import torchvision.models

    model, weights = LPIPS_BACKBONES[net]
    url = getattr(torchvision.models, weights).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def lpips_unavailable(net: str) -> str | None:
    """Why LPIPS with backbone net cannot be built offline, or None when every file it needs is on disk."""
    if not has_module("torchvision"):
        return f"torchvision is not installed: LPIPS needs its {LPIPS_BACKBONES[net][0]} backbone"
    head = lpips_head_file(net)
    if not head.is_file():
        return f"torchmetrics' LPIPS head {head} is missing"
    backbone = lpips_backbone_file(net)
    if not backbone.is_file():
        return f"no {LPIPS_BACKBONES[net][0]} weights at {backbone} (nothing is downloaded)"
    return None


class LpipsDistance:
    """LPIPS between paired images: (a, b) [P, C, H, W] in [0, 1], grey or RGB -> [P], through torchmetrics'
    LearnedPerceptualImagePatchSimilarity (reduction none, inputs in [0, 1]) on chunks of batch_size pairs. Grey
    images are repeated to RGB; images with a side under LPIPS_MIN_SIDE are resized up (bilinear) first."""

    def __init__(self, metric: nn.Module, batch_size: int = 256):
        self.metric, self.batch_size = metric, batch_size

    def prepare(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"LPIPS needs grey or RGB images [P, 1|3, H, W]; got {tuple(images.shape)}")
        side = min(images.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            size = [round(s * LPIPS_MIN_SIDE / side) for s in images.shape[-2:]]
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images.float().clamp(0, 1)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        out = []
        for chunk_a, chunk_b in zip(a.split(self.batch_size), b.split(self.batch_size)):
            self.metric.update(self.prepare(chunk_a), self.prepare(chunk_b))
            out.append(self.metric.compute().reshape(-1))
            self.metric.reset()
        return torch.cat(out)


def build_lpips(net: str | None = "alex",
                device: str | torch.device | None = None) -> tuple[LpipsDistance | None, dict[str, str]]:
    """(LpipsDistance on device, {"lpips_net", "lpips_version"}) where LPIPS can be built from files on disk, else
    (None, {"reason": why not}). net: alex | vgg | squeeze, or None to skip LPIPS. Checks the files before torchmetrics
    builds anything, so nothing is downloaded."""
    if net is None:
        return None, {"reason": "feature_net.lpips_net=null"}
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"feature_net.lpips_net must be one of {sorted(LPIPS_BACKBONES)} or null; got {net!r}")
    reason = lpips_unavailable(net)
    if reason is not None:
        return None, {"reason": reason}
    import torchmetrics
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
    return LpipsDistance(metric.to(device or "cpu")), {"lpips_net": net, "lpips_version": torchmetrics.__version__}


@dataclass
class EvalNets:
    """What evaluate() needs beyond the samples: the FID feature net (with its name; diversity_features looks through
    it too), the dataset classifier and the LPIPS distance (lpips: (a, b) [P, C, H, W] -> [P], with lpips_net and
    lpips_version; lpips_reason says why there is none)."""

    fid_features: nn.Module | None = None
    fid_name: str | None = None
    classifier: ImageClassifier | None = None
    classifier_name: str | None = None
    classifier_test_acc: float | None = None
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None
    lpips_net: str | None = None
    lpips_version: str | None = None
    lpips_reason: str | None = None

    def describe(self) -> str:
        parts = [f"FID features: {self.fid_name}" if self.fid_features is not None else "FID: none (no feature net)"]
        if self.classifier is not None:
            parts.append(f"classifier: {self.classifier_name}, accuracy on the real test images "
                         f"{self.classifier_test_acc:.3f}")
        if self.lpips is not None:
            parts.append(f"LPIPS: {self.lpips_net} (torchmetrics {self.lpips_version})")
        elif self.lpips_reason:
            parts.append(f"LPIPS: none ({self.lpips_reason})")
        return "; ".join(parts)


def check_fid(datamodule, fid: str) -> None:
    """Refuse a feature_net.fid the data cannot have: cgml-bench checks it before any model trains."""
    if fid not in ("auto", "inception", "classifier", "none"):
        raise ValueError(f"feature_net.fid must be auto, inception, classifier or none; got {fid!r}")
    if fid == "classifier" and datamodule.kind == "image" and not has_labels(datamodule):
        raise ValueError(f"feature_net.fid=classifier: {type(datamodule).__name__} has no class labels to train it "
                         f"on; pass feature_net.fid=none (no FID), or feature_net.fid=auto for Inception's features "
                         f"where its weights are on disk (docs/evaluation.md)")


def build_eval_nets(datamodule, fid: str = "auto", cache_dir: str | Path | None = None,
                    inception_weights_path: str | Path | None = None,
                    classifier: dict[str, Any] | None = None, device: str | torch.device | None = None,
                    lpips_net: str | None = "alex") -> EvalNets:
    """fid: auto (Inception where its weights are on disk, else the classifier) | inception | classifier | none.
    The classifier is built whenever the data has class labels (and fid is not none), for sample_class_acc; it
    trains (or loads) on `device`, the device evaluation runs on (default CPU), and stays there.
    lpips_net: the LPIPS backbone (alex, vgg, squeeze; null: none) for image data, built only from files on disk
    (build_lpips), independently of fid."""
    check_fid(datamodule, fid)
    nets = EvalNets()
    if datamodule.kind != "image":
        return nets
    nets.lpips, info = build_lpips(lpips_net, device)
    nets.lpips_net, nets.lpips_version, nets.lpips_reason = (info.get("lpips_net"), info.get("lpips_version"),
                                                             info.get("reason"))
    if fid == "none":
        return nets
    if has_labels(datamodule):
        if cache_dir is None:
            raise ValueError("feature_net.cache_dir is needed to cache the dataset classifier")
        nets.classifier, info = load_or_train_classifier(datamodule, cache_dir, device, **(classifier or {}))
        nets.classifier_name, nets.classifier_test_acc = info["name"], info["test_acc"]
    weights = inception_weights(inception_weights_path) if fid in ("auto", "inception") else None
    if weights is not None:
        nets.fid_features, nets.fid_name = InceptionFeatures(weights), f"inception-v3-compat ({weights.name})"
    elif fid == "inception":
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise FileNotFoundError("feature_net.fid=inception: no usable local Inception weights: it needs torch-fidelity "
                                f"installed and {INCEPTION_FILE} in {hub}, or feature_net.inception_weights_path=FILE "
                                "(nothing is downloaded)")
    elif nets.classifier is not None:
        nets.fid_features, nets.fid_name = ClassifierFeatures(nets.classifier), nets.classifier_name
    log.info("evaluation nets: %s", nets.describe())
    return nets
