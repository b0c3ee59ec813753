"""Few-shot classification fine-tuning of a manifest column: encoder + linear head, trained unfrozen.

SSL_MRI's protocol (AD vs CN with the encoder unfrozen), at CPU size: folds grouped by subject, K subjects of
each class drawn from a fold's training side, the pretrained encoder and its from-scratch twin trained alike
(same draws, recipe, steps and seeds), scored on the fold's test side by balanced accuracy and macro AUC. The
head reads the global average pool of every encoder stage, concatenated: the features the linear probes read,
standardised by the training volumes' statistics as the probes' scaler does (`EncoderClassifier`).
A continuous column becomes classes at `bins` edges (age 55 -> "<55", ">=55"). Volumes are (X, Y, Z) float16 as
the stores hold them; training crops are random (and flipped), test crops central.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.loader import PatchDataset
from training.model import network_from_plan
from training.probe import grouped_folds, macro_auc, subject_groups
from training.segmentation import padded


class EncoderClassifier(nn.Module):
    """A ResEnc encoder and a linear layer on its stages' pooled features, standardised.

    Pooled InstanceNorm features vary little between volumes next to their mean (on the cohort a feature's mean is
    25-44 times its spread across volumes), so a linear layer on them as they are starts with the same logits for
    every input and, in a short fine-tune, predicts one class for all. `standardise` centres and scales each
    feature by the training volumes' statistics under the starting encoder, as the linear probe's StandardScaler
    does; the statistics then stay fixed while the encoder trains.
    """

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = sum(int(c) for c in encoder.output_channels)
        self.head = nn.Linear(width, classes)
        self.register_buffer("center", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([stage.mean(dim=(2, 3, 4)) for stage in self.encoder(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.features(x) - self.center) / self.scale)

    @torch.inference_mode()
    def standardise(self, crops: Sequence[np.ndarray], device: torch.device) -> None:
        """Set `center` and `scale` to the mean and std (floored at 1e-6) of the features of `crops` (P, P, P)."""
        self.to(device).eval()
        found = torch.cat([self.features(torch.from_numpy(np.stack(crops[i : i + 4]))[:, None].to(device)).float()
                           for i in range(0, len(crops), 4)])  # fmt: skip
        self.center.copy_(found.mean(dim=0))
        self.scale.copy_(found.std(dim=0, unbiased=False).clamp_min(1e-6))


class ClassificationTask:
    """The volumes a manifest query selects, with their class, their subject and the folds over subjects."""

    name = "classification"
    metrics = ["balanced_accuracy", "macro_auc"]

    def __init__(self, dataset: PatchDataset, rows: pd.DataFrame, target: str, bins: Sequence[float] = (),
                 folds: int = 3, split_seed: int = 0) -> None:  # fmt: skip
        if target not in rows.columns:
            raise ConfigError(f"--target: {target!r} is not a manifest column; its columns: {', '.join(rows.columns)}")
        volumes, unreadable = {}, []
        for ref, volume in dataset.read_each():
            if isinstance(volume, StoreError):
                unreadable.append(str(volume))
            else:
                volumes[ref.id] = volume.image.copy()  # its own memory: the reader's buffers are lent
        self.unreadable = unreadable
        rows = rows.set_index("id", drop=False).loc[sorted(volumes)].reset_index(drop=True)
        self.classes, y = _classes(rows[target], target, bins)
        keep = y >= 0
        rows, y = rows[keep].reset_index(drop=True), y[keep]
        self.images = [volumes[i] for i in rows["id"]]
        self.y, self.groups = y, subject_groups(rows)
        if len(np.unique(y)) < 2:
            raise ConfigError(f"--target {target}: every labelled volume is of class {self.classes[int(y[0])]!r}; a "
                              "classifier needs two or more")  # fmt: skip
        self.folds = grouped_folds(y, self.groups, kind="categorical", folds=folds, seed=split_seed)
        self.target = target

    def draws(self, shots: int, seed: int) -> list[tuple[str, list[int], list[int]]]:
        """Per fold: `shots` subjects of each class from its training side (all their volumes), its test side."""
        rng = np.random.default_rng([seed, shots])
        out = []
        for fold, (train, test) in enumerate(self.folds):
            subjects = pd.DataFrame({"group": self.groups[train], "y": self.y[train]}).groupby("group")["y"].first()
            chosen = []
            for label, members in subjects.groupby(subjects):
                if len(members) < shots:
                    raise ConfigError(f"--shots {shots}: fold {fold} has {len(members)} training subjects of class "
                                      f"{self.classes[int(label)]!r}")  # fmt: skip
                chosen += list(rng.choice(members.index.to_numpy(), size=shots, replace=False))
            keep = set(chosen)
            out.append((f"fold {fold}", [int(i) for i in train if self.groups[i] in keep], [int(i) for i in test]))
        return out

    def build(self, plan: dict, encoder_state: dict[str, torch.Tensor] | None, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EncoderClassifier(network_from_plan(plan).encoder, len(self.classes))
        if encoder_state is not None:
            model.encoder.load_state_dict(encoder_state, strict=True)
        return model

    def start(self, model: nn.Module, train: list[int], patch: int, device: torch.device) -> None:
        """Standardise the head's features by the training volumes' central crops (`EncoderClassifier`)."""
        model.standardise([_centre(self.images[i], patch) for i in train], device)

    def batch(self, train: list[int], rng: np.random.Generator, size: int, patch: int) -> tuple[torch.Tensor, ...]:
        """Class-balanced draws: a class, then one of its training volumes, a random flipped crop of it."""
        by_class = [[i for i in train if self.y[i] == c] for c in np.unique(self.y[train])]
        images, labels = [], []
        for _ in range(size):
            members = by_class[int(rng.integers(len(by_class)))]
            index = members[int(rng.integers(len(members)))]
            image = padded(self.images[index], patch)
            box = tuple(slice(s, s + patch) for s in (int(rng.integers(n - patch + 1)) for n in image.shape))
            images.append(np.flip(image[box], [a for a in range(3) if rng.random() < 0.5]).astype(np.float32))
            labels.append(int(self.y[index]))
        return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    @torch.inference_mode()
    def score(self, model: nn.Module, test: list[int], patch: int, device: torch.device) -> dict[str, float]:
        model.eval()
        crops = [_centre(self.images[i], patch) for i in test]
        probs = torch.cat([model(torch.from_numpy(np.stack(crops[i : i + 4]))[:, None].to(device)).float().softmax(1)
                           for i in range(0, len(crops), 4)]).cpu().numpy()  # fmt: skip
        y = self.y[test]
        return {"balanced_accuracy": float(balanced_accuracy_score(y, probs.argmax(1))),
                "macro_auc": macro_auc(y, probs, np.arange(len(self.classes)))}  # fmt: skip


def _classes(values: pd.Series, target: str, bins: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """Class names and each row's class index (-1 where the value is missing)."""
    if bins:
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.notna().sum() == 0:
            raise ConfigError(f"--bins: column {target!r} holds no numbers")
        edges = sorted(float(b) for b in bins)
        names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
        names.append(f">={edges[-1]:g}")
        index = np.searchsorted(edges, numbers.to_numpy(), side="right")
        return names, np.where(numbers.notna(), index, -1).astype(int)
    present = values.notna()
    names = sorted(values[present].astype(str).unique())
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.array([lookup[str(v)] if ok else -1 for v, ok in zip(values, present, strict=True)])


def _centre(image: np.ndarray, patch: int) -> np.ndarray:
    image = padded(image, patch)
    return image[tuple(slice((n - patch) // 2, (n - patch) // 2 + patch) for n in image.shape)].astype(np.float32)
