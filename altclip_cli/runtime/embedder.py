"""What classify, embed, search and the server ask of a model, written once over two primitives
that each model provides:

    encode_texts(texts, *, batch_size, normalize) -> (N, D) float32, row i for texts[i]
    stream_images(sources, *, open_fn, batch_size, normalize, workers, input_timeout, boundary)
        -> one inputs.pipeline.ImageResult per source, in input order

The model in this process (runtime/altclip.py: its networks) and a server's (serve/remote.py:
requests) both are `Embedder`s; above the primitives, here only: the embeddings of a list of
images, label embeddings (CLIP's prompt ensemble, the label cache), synonym groups, the softmax
scores, and zero-shot classification. embed's batches of rows are runtime/rows.py's, for both.

No torch here and numpy only when called: a command through a server imports neither torch nor PIL.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np

    from ..inputs.pipeline import ImageResult


class Embedder:
    """The model-facing layer; a subclass gives the primitives and these attributes."""

    embed_dim: int  # D, the width of the joint embedding space
    label_cache = None  # cache.labels.LabelCache of the label embeddings, or None
    draft_min_side: int | None = None  # see AltCLIP.draft_min_side; None where nothing is decoded here

    @property
    def logit_scale(self) -> float:  # exp of the checkpoint's logit_scale
        raise NotImplementedError

    def default_batch_size(self, kind: str) -> int:
        """Inputs per model batch for "image" or "text" when the caller gives none."""
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                     normalize: bool = True) -> np.ndarray:
        raise NotImplementedError

    def stream_images(self, sources: Iterable, **options) -> Iterator[ImageResult]:
        raise NotImplementedError

    # --- above the primitives --------------------------------------------------------------------

    def encode_images(self, images: Sequence, *, batch_size: int | None = None,
                      normalize: bool = True) -> np.ndarray:
        """(N, D) float32, row i for images[i]: what stream_images takes, used as it is (in this
        process PIL images; through a server inputs.sources.Source, decoded there). The first
        that fails raises its InputError."""
        import numpy as np

        results = list(self.stream_images(images, open_fn=_as_is, batch_size=batch_size, normalize=normalize,
                                          input_timeout=None))  # in memory: nothing to wait for
        for r in results:
            if r.error is not None:
                raise r.error
        return np.stack([r.embedding for r in results]) if results else np.zeros((0, self.embed_dim), np.float32)

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None, *,
                         batch_size: int | None = None) -> np.ndarray:
        """(L, D) float32, L2-normalised. With templates, CLIP's prompt ensemble: the mean of
        the normalised embeddings of every template filled with the label, normalised again.
        Labels found in the label cache skip the text tower. batch_size: texts per model batch."""
        import numpy as np

        labels = list(labels)
        templates = list(templates or [])
        found = self.label_cache.get(set(labels), templates) if self.label_cache and labels else {}
        missing = list(dict.fromkeys(label for label in labels if label not in found))
        if missing:
            computed = dict(zip(missing, self._embed_labels(missing, templates, batch_size)))
            if self.label_cache:
                self.label_cache.put(computed, templates)
            found.update(computed)
        return np.stack([found[label] for label in labels]) if labels else np.zeros((0, self.embed_dim), np.float32)

    def _embed_labels(self, labels: list[str], templates: list[str], batch_size: int | None) -> np.ndarray:
        if not templates:
            return self.encode_texts(labels, batch_size=batch_size)
        filled = [t.replace("{}", label) for label in labels for t in templates]
        emb = self.encode_texts(filled, batch_size=batch_size).reshape(len(labels), len(templates), -1)  # (L, T, D)
        return normalized(emb.mean(axis=1, dtype="float32"))

    def group_embeddings(self, groups: Sequence[Sequence[str]], templates: Sequence[str] | None = None, *,
                         batch_size: int | None = None) -> np.ndarray:
        """(G, D) float32, L2-normalised: one row per synonym group (e.g. ["cat", "猫", "gato"]).
        A group's row is the mean of the normalised embeddings of its alternatives (with
        templates: of every alternative in every template), normalised again. A group of one is
        exactly label_embeddings' row."""
        import numpy as np

        groups = [list(g) for g in groups]
        templates = list(templates or [])
        out = np.zeros((len(groups), self.embed_dim), np.float32)
        singles = [i for i, g in enumerate(groups) if len(g) == 1]
        if singles:
            out[singles] = self.label_embeddings([groups[i][0] for i in singles], templates, batch_size=batch_size)
        texts_of = {i: [t.replace("{}", a) for a in g for t in templates] if templates else g
                    for i, g in enumerate(groups) if len(g) > 1}
        if texts_of:  # one call for every group's texts: one model pass, the label cache per text
            texts = list(dict.fromkeys(t for ts in texts_of.values() for t in ts))
            rows = dict(zip(texts, self.label_embeddings(texts, None, batch_size=batch_size)))
            for i, ts in texts_of.items():
                out[i] = normalized(np.mean([rows[t] for t in ts], axis=0, dtype=np.float32))  # (D,) of (A*T, D)
        return out

    def scores(self, image_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits), each (N_images, N_labels) float32, from normalised embeddings: logits
        are the cosine similarities times the logit scale, probs their softmax over the labels
        (the reference's logits_per_image and its softmax)."""
        import numpy as np

        image_emb, label_emb = np.asarray(image_emb, np.float32), np.asarray(label_emb, np.float32)
        logits = (image_emb @ label_emb.T) * np.float32(self.logit_scale)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True), logits

    def classify(self, images: Sequence, labels: Sequence[str], *,
                 templates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits), each (N_images, N_labels) float32, for images as encode_images takes them."""
        return self.scores(self.encode_images(images), self.label_embeddings(labels, templates))


def normalized(emb: np.ndarray) -> np.ndarray:
    """Rows over their L2 norm, as torch.nn.functional.normalize: x / max(|x|, 1e-12), float32."""
    import numpy as np

    emb = np.asarray(emb, np.float32)
    norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    return (emb / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


def _as_is(image):
    return image
