"""Does the digits model draw the digit it was asked for?

A classifier trained independently on real digits (scikit-learn's SVM on the hold-out split,
which the diffusion model never trained on) reads each generated image. Colour is removed
first: the brightest channel recovers the stroke intensity of a tinted digit, and a per-image
min-max stretch undoes the background shift that colour guidance adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DigitsQuality:
    accuracy: float
    per_class: dict[int, float]
    num_samples: int

    def table(self) -> str:
        rows = ["| digit | " + " | ".join(str(k) for k in self.per_class) + " | all |",
                "|---" * (len(self.per_class) + 2) + "|",
                "| accuracy | " + " | ".join(f"{v:.0%}" for v in self.per_class.values()) + f" | {self.accuracy:.1%} |"]
        return "\n".join(rows)


def to_classifier_features(images01: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> [N, 64] on the 0..16 scale of scikit-learn's 8x8 digits."""
    gray = images01.float().amax(dim=1, keepdim=True)
    lo = gray.amin(dim=(2, 3), keepdim=True)
    hi = gray.amax(dim=(2, 3), keepdim=True)
    gray = (gray - lo) / (hi - lo).clamp(min=1e-3)
    small = F.adaptive_avg_pool2d(gray, (8, 8))
    return (small * 16).flatten(1)


def digit_classifier():
    """An SVM fitted on the hold-out split of the real digits (never seen by the diffusion model)."""
    from sklearn.svm import SVC

    from diffrt.data import load_digits

    holdout = load_digits(size=16, split="holdout")
    features = to_classifier_features((holdout.images + 1) / 2)
    return SVC(C=10.0, gamma="scale").fit(features.numpy(), holdout.labels.numpy())


def score_digits(classifier, images01: torch.Tensor, labels: torch.Tensor) -> DigitsQuality:
    if len(images01) == 0 or len(images01) != len(labels):
        raise ValueError(f"score_digits takes one label per image, and at least one: got {len(images01)} images and "
                         f"{len(labels)} labels")
    predicted = torch.as_tensor(classifier.predict(to_classifier_features(images01).numpy()))
    correct = predicted == labels.cpu()
    per_class = {int(c): correct[labels.cpu() == c].float().mean().item() for c in labels.unique()}
    return DigitsQuality(correct.float().mean().item(), per_class, len(labels))
