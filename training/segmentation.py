"""Few-shot segmentation fine-tuning: K labelled subjects, the whole U-Net trained, Dice on held-out subjects.

The protocol of AMAES's and "Revisiting MAE"'s comparisons, at CPU size: the pretrained encoder's weights are
transferred into a network of its architecture whose decoder and segmentation head are new, and the same K
subjects, recipe, step budget and seeds train it and its from-scratch twin. Patches are drawn as nnU-Net draws
them (a third centred on a random foreground voxel, the rest anywhere), flipped at random; the loss is nnU-Net's
Dice + cross-entropy; held-out volumes are predicted by sliding windows at half-patch steps, averaging softmax.
Arrays are (X, Y, Z); batches (B, C, X, Y, Z).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openmind_tools.errors import ConfigError
from openmind_tools.nnunet_dataset import Case
from training.model import network_from_plan

_WINDOWS_PER_PASS = 4  # sliding windows predicted in one forward pass
_FOREGROUND = 1 / 3  # share of training patches centred on a labelled voxel (nnU-Net's oversample_foreground_percent)


class SegmentationTask:
    """A labelled dataset split once into a pool of training subjects and held-out test subjects."""

    name = "segmentation"

    def __init__(self, cases: Sequence[Case], labels: Sequence[str], test_subjects: int, split_seed: int = 0):
        self.cases, self.labels = list(cases), list(labels)
        subjects = sorted({case.subject for case in self.cases})
        if not 1 <= test_subjects < len(subjects):
            raise ConfigError(f"--test-subjects: expected 1 to {len(subjects) - 1} of the {len(subjects)} subjects, "
                              f"got {test_subjects}")  # fmt: skip
        order = np.random.default_rng(split_seed).permutation(len(subjects))
        self.test = [subjects[i] for i in sorted(order[:test_subjects])]
        self.pool = [subjects[i] for i in sorted(order[test_subjects:])]
        self.metrics = [f"dice_{label}" for label in self.labels[1:]] + ["mean_dice"]

    def draws(self, shots: int, seed: int) -> list[tuple[str, list[int], list[int]]]:
        """One split per seed: `shots` subjects drawn from the pool to train on, the fixed test subjects to score."""
        if shots > len(self.pool):
            raise ConfigError(f"--shots {shots}: only {len(self.pool)} subjects are left for training (the other "
                              f"{len(self.test)} are held out)")  # fmt: skip
        chosen = set(np.random.default_rng([seed, shots]).choice(self.pool, size=shots, replace=False))
        train = [i for i, case in enumerate(self.cases) if case.subject in chosen]
        test = [i for i, case in enumerate(self.cases) if case.subject in self.test]
        return [("held-out", train, test)]

    def build(self, plan: dict, encoder_state: dict[str, torch.Tensor] | None, seed: int) -> nn.Module:
        """The plan's U-Net with one output per class: a new decoder, and the encoder's weights if given."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = network_from_plan(plan, num_classes=len(self.labels))
        if encoder_state is not None:
            net.encoder.load_state_dict(encoder_state, strict=True)
        return net

    def start(self, model: nn.Module, train: list[int], patch: int, device: torch.device) -> None:
        """Nothing to ready: the U-Net's decoder is new and its normalisation per sample."""

    def batch(self, train: list[int], rng: np.random.Generator, size: int, patch: int) -> tuple[torch.Tensor, ...]:
        images, labels = [], []
        for _ in range(size):
            case = self.cases[train[int(rng.integers(len(train)))]]
            image, label = padded(case.image, patch), padded(case.label, patch)
            centre = None
            if rng.random() < _FOREGROUND and (label > 0).any():
                voxels = np.argwhere(label > 0)
                centre = voxels[int(rng.integers(len(voxels)))]
            box = _box(label.shape, patch, rng, centre)
            flips = [axis for axis in range(3) if rng.random() < 0.5]
            images.append(np.flip(image[box], flips).copy())
            labels.append(np.flip(label[box], flips).copy())
        return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(labels)).long()

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(output, target)

    def score(self, model: nn.Module, test: list[int], patch: int, device: torch.device) -> dict[str, float]:
        """Dice per foreground class, averaged over the test volumes where the class is present in the truth or
        the prediction (NaN where it is in neither, as nnU-Net reports it), and their mean."""
        per_case = np.array([dice(predict(model, self.cases[i].image, patch, device), self.cases[i].label,
                                      len(self.labels)) for i in test])  # fmt: skip
        with warnings.catch_warnings():  # a class absent from every test volume is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            classes = np.nanmean(per_case, axis=0)
            values = [*classes, float(np.nanmean(classes))]
        return dict(zip(self.metrics, (float(v) for v in values), strict=True))


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """nnU-Net's DC_and_CE_loss: cross-entropy plus (1 - soft Dice over the foreground classes, batch-wise)."""
    ce = F.cross_entropy(logits, target)
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    soft_dice = (2 * intersection + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return ce + (1 - soft_dice.mean())


@torch.inference_mode()
def predict(model: nn.Module, image: np.ndarray, patch: int, device: torch.device) -> np.ndarray:
    """Class map of a whole volume: softmax averaged over windows at half-patch steps (the volume padded to a
    patch where it is smaller), argmax."""
    model.eval()
    whole = padded(image, patch)
    volume = torch.from_numpy(whole)[None, None].to(device)
    sums: torch.Tensor | None = None
    counts = torch.zeros(whole.shape, device=device)
    boxes = [tuple(slice(s, s + patch) for s in starts) for starts in _windows(whole.shape, patch)]
    for first in range(0, len(boxes), _WINDOWS_PER_PASS):
        chunk = boxes[first : first + _WINDOWS_PER_PASS]
        probs = model(torch.cat([volume[(..., *box)] for box in chunk])).float().softmax(1)
        sums = torch.zeros((probs.shape[1], *whole.shape), device=device) if sums is None else sums
        for box, p in zip(chunk, probs, strict=True):
            sums[(slice(None), *box)] += p
            counts[box] += 1
    labels = (sums / counts).argmax(0).cpu().numpy().astype(np.uint8)
    return labels[tuple(slice(0, n) for n in image.shape)]


def dice(prediction: np.ndarray, truth: np.ndarray, classes: int) -> list[float]:
    """Dice of each foreground class 1..classes-1; NaN where neither map holds the class."""
    scores = []
    for c in range(1, classes):
        p, t = prediction == c, truth == c
        total = int(p.sum()) + int(t.sum())
        scores.append(2 * int((p & t).sum()) / total if total else math.nan)
    return scores


def _windows(shape: tuple[int, ...], patch: int) -> list[tuple[int, ...]]:
    axes = []
    for n in shape:
        steps = max(1, math.ceil((n - patch) / (patch // 2)) + 1)
        axes.append(sorted({round(i * (n - patch) / max(steps - 1, 1)) for i in range(steps)}))
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def padded(array: np.ndarray, patch: int) -> np.ndarray:
    """`array` zero-padded at its far end to at least `patch` along each axis (a volume smaller than a patch)."""
    pad = [(0, max(0, patch - n)) for n in array.shape]
    return np.pad(array, pad) if any(after for _, after in pad) else array


def _box(shape: tuple[int, ...], patch: int, rng: np.random.Generator, centre: np.ndarray | None) -> tuple:
    starts = []
    for axis, n in enumerate(shape):
        high = n - patch
        start = int(rng.integers(high + 1)) if centre is None else int(np.clip(centre[axis] - patch // 2, 0, high))
        starts.append(slice(start, start + patch))
    return tuple(starts)
