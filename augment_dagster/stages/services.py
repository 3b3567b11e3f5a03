"""What a method's post_filter may use (no Dagster): images, a stored classifier's features, CLIP zero-shot."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..data.images import ImageSource, to_tensor
from ..store import BlobStore


class FilterServices:
    """What a method's post_filter may use: images, classifier features, CLIP zero-shot."""

    def __init__(self, images: ImageSource, blobs: BlobStore, image_size: int, clip_factory: Callable[[], Any] | None = None):
        self.images, self.blobs, self.image_size, self.clip_factory = images, blobs, image_size, clip_factory

    def real_image(self, image_id: str):
        return self.images.real(image_id)

    def synthetic_image(self, blob: str):
        return self.images.synthetic(blob)

    def classifier_features(self, classifier_blob: str, pil_images: list) -> np.ndarray:
        """L2-normalised penultimate features of a stored classifier."""
        import torch

        from ..training.loop import extract_features
        from ..training.stage import load_classifier_blob

        model, _ = load_classifier_blob(self.blobs, classifier_blob)
        with torch.no_grad():
            f = extract_features(model, to_tensor(pil_images, self.image_size))
        f = torch.nn.functional.normalize(f.float(), dim=1)
        return f.numpy()

    def _classifier_logits(self, classifier_blob: str, pil_images: list):
        """(the stored classifier's classes, its logits [N, C] on the images)."""
        import torch

        from ..training.loop import predict_logits
        from ..training.stage import load_classifier_blob

        model, meta = load_classifier_blob(self.blobs, classifier_blob)
        with torch.no_grad():
            return list(meta["classes"]), predict_logits(model, to_tensor(pil_images, self.image_size))

    def classifier_confusion(self, classifier_blob: str, image_ids: list[str], labels: list[str]) -> tuple[list[str], np.ndarray]:
        """(classes, cm[true, pred]) of a stored classifier on real images (e.g. the train split: GeNIe's
        ``confusion_topk`` sources)."""
        from ..metrics import confusion_matrix

        classes, logits = self._classifier_logits(classifier_blob, [self.real_image(i) for i in image_ids])
        return classes, confusion_matrix(logits.argmax(1), [classes.index(lb) for lb in labels], len(classes))

    def classifier_probs(self, classifier_blob: str, pil_images: list, class_names: list[str]) -> np.ndarray:
        """Softmax of a stored classifier on images, [N, C] with columns in ``class_names`` order (a class the
        classifier does not know gets 0)."""
        import torch

        known, logits = self._classifier_logits(classifier_blob, pil_images)
        p = torch.softmax(logits.float(), dim=1).numpy()
        out = np.zeros((len(pil_images), len(class_names)), dtype=np.float32)
        for j, c in enumerate(class_names):
            if c in known:
                out[:, j] = p[:, known.index(c)]
        return out

    def clip_image_features(self, pil_images: list) -> np.ndarray:
        """L2-normalised CLIP image embeddings (``models.clip``)."""
        from ..models.clip_ops import image_features

        return image_features(self.clip_factory(), pil_images).numpy()

    def clip_zero_shot(self, pil_images: list, class_names: list[str], template: str = "a photo of a {}") -> np.ndarray:
        """Softmax over class prompts of CLIP image-text similarity, [N, C]."""
        from ..models.clip_ops import zero_shot_probs

        return zero_shot_probs(self.clip_factory(), pil_images, [template.format(c) for c in class_names])
