"""Text side of the generation core (no Dagster): prompts (plain or weighted segments), concept tokens and their
vectors, text-encoder states. :class:`TextEncoding` is mixed into ``models.generation.GenerationCore``.

Weighted prompts (SGID): ``output`` weighting scales the text-encoder output states per token and restores their
overall mean (the lpw / A1111 convention, :func:`mean_restore_factor`); ``input_embeddings`` scales the token
embedding rows before the encoder.

Concept injection (``GenRequest.concepts``): placeholder tokens missing from the tokenizer are added
(``tokenizer.add_tokens`` + ``text_encoder.resize_token_embeddings``) and the given vectors are written into
those input-embedding rows under ``no_grad`` right before the prompts that use them are encoded. This MUTATES the
bundle's tokenizer/text encoder (new rows only; pre-existing rows are never written): the table keeps the last
vectors written, and a later call with other vectors for the same token overwrites them. Requests of one batch
that give different vectors for the same token are encoded in separate sub-batches, so each gets its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

WEIGHTINGS = ("output", "input_embeddings")


@dataclass
class Prompt:
    """A prompt made of weighted segments, e.g. SGID: [("A picture of a dog", 1.5), (", on grass", 0.9)]."""

    segments: list[tuple[str, float]]

    @classmethod
    def of(cls, text_or_prompt: "str | Prompt") -> "Prompt":
        if isinstance(text_or_prompt, Prompt):
            return text_or_prompt
        return cls([(str(text_or_prompt), 1.0)])

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    @property
    def weighted(self) -> bool:
        return any(float(w) != 1.0 for _, w in self.segments)


@dataclass
class _Encoded:
    embeds: torch.Tensor  # what the UNet sees
    unrestored: torch.Tensor | None = None  # output weighting only: weighted states before the mean restore


@dataclass
class _SubBatch:
    concepts: dict[str, torch.Tensor]
    weighting: str
    idx: list[int] = field(default_factory=list)


def mean_restore_factor(states: torch.Tensor, weighted: torch.Tensor, rel_eps: float = 1e-3,
                        max_ratio: float = 10.0) -> torch.Tensor:
    """Per prompt, mean(states) / mean(weighted) (the lpw / A1111 mean restore), shape [B, 1, 1].

    Text encoders whose final LayerNorm centres every state (bias ≈ 0: the mean over tokens × dims is ~1e-9, as in
    the tiny text encoder) make that ratio 0/0: it explodes to inf or collapses the states to 0, and the image
    decodes black. Where |mean(weighted)| < ``rel_eps``·mean|weighted| or the ratio is outside
    [1/max_ratio, max_ratio], the factor is 1 (weighted states kept as they are)."""
    num = states.mean(dim=(1, 2), keepdim=True)
    den = weighted.mean(dim=(1, 2), keepdim=True)
    scale = weighted.abs().mean(dim=(1, 2), keepdim=True)
    ratio = num / torch.where(den == 0, torch.ones_like(den), den)
    ok = (den.abs() >= rel_eps * scale) & torch.isfinite(ratio) & (ratio >= 1.0 / max_ratio) & (ratio <= max_ratio)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def _same_vector(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu()))


class TextEncoding:
    """Prompt and concept encoding of the generation core (uses its ``pipe`` and ``dtype``)."""

    def _ensure_concepts(self, concepts: dict[str, torch.Tensor] | None) -> None:
        """Add missing placeholder tokens and write the vectors into their embedding rows (see module doc)."""
        if not concepts:
            return
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        vocab = tok.get_vocab()
        missing = [t for t in concepts if t not in vocab]
        if missing:
            tok.add_tokens(missing)
        emb = te.get_input_embeddings()
        if emb.weight.shape[0] < len(tok):
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = te.get_input_embeddings()
        with torch.no_grad():
            for t, v in concepts.items():
                ids = tok.convert_tokens_to_ids([t])
                i = ids[0]
                if not isinstance(i, int) or i < 0 or i >= emb.weight.shape[0]:
                    raise ValueError(f"concept token {t!r} could not be added to the tokenizer")
                if tuple(v.shape[-1:]) != (emb.weight.shape[1],) or v.numel() != emb.weight.shape[1]:
                    raise ValueError(f"concept {t!r}: vector of shape {tuple(v.shape)}, the text encoder expects "
                                     f"{emb.weight.shape[1]} dims")
                emb.weight[i] = v.reshape(-1).to(emb.weight.device, emb.weight.dtype)

    def token_ids_and_weights(self, prompt: "str | Prompt") -> tuple[list[int], list[float]]:
        """Token ids (BOS + segments + EOS, padded/truncated to ``model_max_length``) and each token's weight."""
        prompt = Prompt.of(prompt)
        tok = self.pipe.tokenizer
        L = tok.model_max_length
        ids, ws = [tok.bos_token_id], [1.0]
        for text, w in prompt.segments:
            seg = tok(text, add_special_tokens=False)["input_ids"]
            ids += seg
            ws += [float(w)] * len(seg)
        ids, ws = ids[: L - 1] + [tok.eos_token_id], ws[: L - 1] + [1.0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ws += [1.0] * (L - len(ids))
        ids += [pad] * (L - len(ids))
        return ids, ws

    def _encode(self, prompts: list[Prompt], concepts=None, weighting: str = "output") -> _Encoded:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
        self._ensure_concepts(concepts)
        te = self.pipe.text_encoder
        dev = next(te.parameters()).device
        rows = [self.token_ids_and_weights(p) for p in prompts]
        ids = torch.tensor([r[0] for r in rows], device=dev)
        w = torch.tensor([r[1] for r in rows], device=dev, dtype=torch.float32)
        weighted = bool((w != 1.0).any())
        with torch.inference_mode():
            if weighted and weighting == "input_embeddings":
                # scale the token-embedding rows (not the position embeddings) via a forward hook
                hook = te.get_input_embeddings().register_forward_hook(lambda m, i, o: o * w[..., None].to(o.dtype))
                try:
                    out = te(ids)[0]
                finally:
                    hook.remove()
                return _Encoded(out.to(self.dtype))
            out = te(ids)[0]
            if not weighted:
                return _Encoded(out.to(self.dtype))
            # lpw / A1111 convention: weight the output states per token, then restore the overall mean
            o = out.float()
            scaled = o * w[..., None]
            return _Encoded((scaled * mean_restore_factor(o, scaled)).to(self.dtype), unrestored=scaled)

    def encode_prompts(self, prompts: list["str | Prompt"], concepts: dict[str, torch.Tensor] | None = None,
                       weighting: str = "output", restore_mean: bool = True) -> torch.Tensor:
        """Text-encoder states [B, 77, D] for the UNet. ``restore_mean=False`` (output weighting only) returns
        the weighted states before the mean restore: the states of tokens with weight 1 are then unchanged."""
        enc = self._encode([Prompt.of(p) for p in prompts], concepts, weighting)
        if not restore_mean and enc.unrestored is not None:
            return enc.unrestored.to(self.dtype)
        return enc.embeds

    def _encode_requests(self, prompts: list[Prompt], reqs: list) -> torch.Tensor:
        """Encode per-request prompts, in sub-batches of requests whose concepts agree and weighting is equal."""
        subs: list[_SubBatch] = []
        for i, r in enumerate(reqs):
            c = r.concepts or {}
            for s in subs:
                if s.weighting == r.weighting and all(_same_vector(s.concepts[k], v) for k, v in c.items() if k in s.concepts):
                    s.concepts.update(c)
                    s.idx.append(i)
                    break
            else:
                subs.append(_SubBatch(dict(c), r.weighting, [i]))
        out: torch.Tensor | None = None
        for s in subs:
            e = self._encode([prompts[i] for i in s.idx], s.concepts, s.weighting).embeds
            if len(subs) == 1:
                return e
            if out is None:
                out = torch.empty((len(reqs), *e.shape[1:]), dtype=e.dtype, device=e.device)
            out[s.idx] = e
        return out


def noisy_vector(base, sigma: float, noise_seed: int):
    """S* + σ·ε with ε ~ N(0, I) drawn from ``noise_seed`` (float32). DIAGen's fixed noise draws
    (``methods.diagen.noise_variants``) and its ``resample_per_image`` option, applied per unit by the runner."""
    import torch

    g = torch.Generator().manual_seed(int(noise_seed))
    eps = torch.randn(base.shape, generator=g, dtype=torch.float32)
    return base.float() + float(sigma) * eps
