"""CLIP and BLIP operations on loaded bundles (``models.loading.load_clip`` / ``load_captioner``).

transformers 5: ``get_image_features``/``get_text_features`` return a ``BaseModelOutputWithPooling`` whose
``pooler_output`` is the projected embedding (ENVIRONMENT.md §3); older versions return the tensor."""
from __future__ import annotations

import numpy as np


def _as_tensor(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def image_features(bundle, images, batch_size: int = 64):
    """L2-normalised CLIP image embeddings, [N, D] (torch, on CPU)."""
    import torch

    feats = []
    model, proc = bundle.model, bundle.processor
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            px = proc(images=[im.convert("RGB") for im in images[i:i + batch_size]], return_tensors="pt")["pixel_values"]
            f = _as_tensor(model.get_image_features(pixel_values=px.to(dev, dtype=model.dtype)))
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, model.config.projection_dim)


def text_features(bundle, texts: list[str], batch_size: int = 256):
    import torch

    model, proc = bundle.model, bundle.processor
    dev = next(model.parameters()).device
    feats = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tok = proc.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
            f = _as_tensor(model.get_text_features(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev)))
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, model.config.projection_dim)


def pair_similarity(bundle, images, texts: list[str]) -> np.ndarray:
    """Cosine similarity of image i with text i, [N]."""
    fi, ft = image_features(bundle, images), text_features(bundle, texts)
    return (fi * ft).sum(-1).numpy()


def zero_shot_probs(bundle, images, prompts: list[str]) -> np.ndarray:
    """Softmax over ``prompts`` of CLIP logits (logit_scale · cosine), [N, C]."""
    import torch

    fi, ft = image_features(bundle, images), text_features(bundle, prompts)
    scale = float(bundle.model.logit_scale.exp()) if hasattr(bundle.model, "logit_scale") else 100.0
    return torch.softmax(scale * fi @ ft.T, dim=-1).numpy()


def caption_candidates(bundle, image, seed: int, n_nucleus: int = 10, top_p: float = 0.9, num_beams: int = 3,
                       min_length: int = 5, max_length: int = 20) -> list[tuple[str, str]]:
    """BLIP captions of one image: ('greedy', c), ('beam', c) and n_nucleus × ('nucleus', c) (seeded)."""
    import torch

    model, proc = bundle.model, bundle.processor
    dev = next(model.parameters()).device
    inputs = proc(images=image.convert("RGB"), return_tensors="pt")
    px = inputs["pixel_values"].to(dev, dtype=model.dtype)
    common = dict(min_new_tokens=min_length, max_new_tokens=max_length)
    out = []
    with torch.inference_mode():
        g = model.generate(pixel_values=px, do_sample=False, num_beams=1, **common)
        out.append(("greedy", proc.decode(g[0], skip_special_tokens=True).strip()))
        b = model.generate(pixel_values=px, do_sample=False, num_beams=num_beams, **common)
        out.append(("beam", proc.decode(b[0], skip_special_tokens=True).strip()))
        if n_nucleus:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                s = model.generate(pixel_values=px.expand(n_nucleus, -1, -1, -1), do_sample=True, top_p=top_p, top_k=0, **common)
            out += [("nucleus", proc.decode(x, skip_special_tokens=True).strip()) for x in s]
    return out
