#!/usr/bin/env python
"""Train the tiny embedded default models (``models.*.source: tiny``) on the built-in shapes dataset.

Trains, in order, on a large generated ``pretrain`` pool (disjoint from the demo's train/test/ood pools):
  (a) the VAE (AutoencoderKL, L1 + MSE + tiny KL; ``scaling_factor`` = 1/std of the latents),
  (b) the text-conditioned UNet (frozen random CLIP text encoder of ``build_tiny_sd(size="base")``,
      DDPM scaled_linear betas, eps prediction, min-SNR gamma=5),
  (c) a tiny CLIP (contrastive InfoNCE on image-caption pairs),
  (d) a tiny BLIP captioner (teacher-forced LM loss, decoder conditioned on the vision tower),
  (e) a tiny judge classifier (``TinyCNN``, used by the evidence tests; ``<out>/judge.pt``),
  (f) the ``tiny-pretrained`` classifier backbone (``TinyCNN`` width 32, supervised on the pretrain pool's 5
      named classes, "star" held out; ``<out>/tiny-backbone.pt``, fp16): the frozen encoder of linear probes, DIAGen's filter
      and the episodic evaluation (stage ``backbone``; evidence = linear-probe accuracy on the demo pools).
The class name "star" never appears in any caption (it is replaced by "shape"), so textual inversion has
something to learn; 10 % of the diffusion captions are empty (classifier-free guidance).

Every stage is time-boxed (``--<stage>-minutes``; the LR schedule follows the elapsed fraction) unless a
fixed step count is given (``--<stage>-steps``, fully reproducible). Seeded.

    OMP_WAIT_POLICY=PASSIVE python scripts/train_tiny_models.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from augment_dagster.data.builtin import SHAPES, caption, generate_pool  # noqa: E402
from augment_dagster.models import tiny  # noqa: E402

HELD_OUT = "star"
GENERIC = "shape"
SIZE = tiny.TINY_RESOLUTION


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------- data
def make_data(per_class: int, seed: int):
    imgs, attrs = [], []
    for cls in SHAPES:
        for img, a in generate_pool("pretrain", cls, per_class, seed, SIZE):
            imgs.append(img)
            attrs.append(a)
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in imgs])).permute(0, 3, 1, 2).contiguous()
    return imgs, x, attrs  # x: uint8 [N,3,H,W]


def templated_caption(a, name: str, r: float, cuts: tuple[float, float, float]) -> str:
    """TINY_MODELS.md templates, chosen by ``r`` in [0, 1): full caption below cuts[0], then colour only,
    then texture only, then the bare name."""
    night = " at night" if a.time == "night" else ""
    if r < cuts[0]:
        return "a photo of " + caption(a, name)
    if r < cuts[1]:
        return f"a photo of a {a.colour} {name}{night}"
    if r < cuts[2]:
        return f"a photo of a {name} on a {a.texture} background{night}"
    return f"a photo of a {name}"


def diffusion_caption(a, rng: random.Random, generic_p: float = 0.4, empty_p: float = 0.1) -> str:
    """UNet captions: "star" always becomes "shape", other classes with p = generic_p; empty with p = empty_p."""
    if rng.random() < empty_p:
        return ""
    name = GENERIC if a.shape == HELD_OUT or rng.random() < generic_p else a.shape
    return templated_caption(a, name, rng.random(), (0.5, 0.65, 0.8))


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float() / 127.5 - 1.0


def warmup_cosine(frac: float, step: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class Box:
    """A stage's budget: a fixed step count, or a wall-clock box (then progress = elapsed fraction)."""

    def __init__(self, minutes: float, steps: int | None):
        self.minutes, self.steps, self.t0, self.step = minutes, steps, time.time(), 0

    def frac(self) -> float:
        if self.steps:
            return self.step / self.steps
        return (time.time() - self.t0) / (60 * self.minutes)

    def done(self) -> bool:
        return self.frac() >= 1.0

    def elapsed(self) -> float:
        return time.time() - self.t0


# ----------------------------------------------------------------------------- (a) VAE
def train_vae(pipe, x_u8, args, report):
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 1)
    box, losses = Box(args.vae_minutes, args.vae_steps), []
    n = len(x_u8)
    while not box.done():
        for pg in opt.param_groups:
            pg["lr"] = args.vae_lr * warmup_cosine(box.frac(), box.step, 50)
        idx = torch.randint(0, n, (args.vae_bs,), generator=g)
        x = to_unit(x_u8[idx])
        flip = torch.rand(len(x), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().sum() / len(x)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        box.step += 1
        if box.step % 50 == 0:
            log(f"vae step {box.step} loss {np.mean(losses[-50:]):.4f} ({box.step * args.vae_bs / box.elapsed():.1f} img/s)")
    vae.eval().requires_grad_(False)
    # latents: posterior mean/std of every image and its mirror
    means, stds = [], []
    with torch.no_grad():
        for flip in (False, True):
            for i in range(0, n, 256):
                x = to_unit(x_u8[i:i + 256])
                if flip:
                    x = x.flip(-1)
                post = vae.encode(x).latent_dist
                means.append(post.mean)
                stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)
        sample = mean + std * torch.randn(mean.shape, generator=g)
        sf = 1.0 / float(sample.std())
        m = min(256, n)
        rec = vae.decode(mean[:m]).sample.clamp(-1, 1)
        mse = float(F.mse_loss(rec, to_unit(x_u8[:m])))
    vae.register_to_config(scaling_factor=round(sf, 6))
    report["vae"] = dict(steps=box.step, batch_size=args.vae_bs, wall_s=round(box.elapsed(), 1),
                         final_loss=round(float(np.mean(losses[-50:])), 4), scaling_factor=round(sf, 6),
                         recon_psnr_db=round(10 * math.log10(4.0 / mse), 2),
                         params=sum(p.numel() for p in vae.parameters()))
    log("vae done", report["vae"])
    return mean, std, sf


# ----------------------------------------------------------------------------- (b) UNet
def encode_texts(pipe, texts: list[str]) -> torch.Tensor:
    tok, te = pipe.tokenizer, pipe.text_encoder
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 256):
            ids = tok(texts[i:i + 256], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out.append(te(ids)[0])
    return torch.cat(out)


def train_unet(pipe, attrs, lat_mean, lat_std, sf, args, report):
    from diffusers import DDPMScheduler

    rng = random.Random(args.seed + 2)
    n = len(attrs)
    K = 8  # captions drawn per image (per flip copy), embeddings cached
    caps = [[diffusion_caption(attrs[i % n], rng) for _ in range(K)] for i in range(2 * n)]
    uniq = sorted({c for cs in caps for c in cs})
    cidx = {c: j for j, c in enumerate(uniq)}
    cap_ids = torch.tensor([[cidx[c] for c in cs] for cs in caps])
    emb = encode_texts(pipe, uniq)
    log(f"unet: {len(uniq)} distinct captions cached")
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, prediction_type="epsilon")
    ac = noise_sched.alphas_cumprod
    snr = ac / (1 - ac)
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(args.seed + 3)
    box, losses, mses = Box(args.unet_minutes, args.unet_steps), [], []
    N = len(lat_mean)
    while not box.done():
        for pg in opt.param_groups:
            pg["lr"] = args.unet_lr * warmup_cosine(box.frac(), box.step, 100)
        idx = torch.randint(0, N, (args.unet_bs,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        c = emb[cap_ids[idx, torch.randint(0, K, (len(idx),), generator=g)]]
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, eps, t)
        pred = unet(zt, t, encoder_hidden_states=c).sample
        per = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        w = torch.clamp(snr[t], max=args.snr_gamma) / snr[t]
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        mses.append(per.mean().item())
        box.step += 1
        if box.step % 50 == 0:
            log(f"unet step {box.step} loss {np.mean(losses[-50:]):.4f} eps-mse {np.mean(mses[-50:]):.4f} "
                f"({box.step * args.unet_bs / box.elapsed():.1f} samples/s, {box.elapsed() / 60:.1f} min)")
    unet.eval().requires_grad_(False)
    report["unet"] = dict(steps=box.step, batch_size=args.unet_bs, wall_s=round(box.elapsed(), 1),
                          final_loss_minsnr=round(float(np.mean(losses[-50:])), 4),
                          final_eps_mse=round(float(np.mean(mses[-50:])), 4), distinct_captions=len(uniq),
                          params=sum(p.numel() for p in unet.parameters()))
    log("unet done", report["unet"])


# ----------------------------------------------------------------------------- (c) CLIP
def clip_caption(a, rng: random.Random) -> str:
    """CLIP captions: every named class by name, "star" as "shape", never empty."""
    return templated_caption(a, GENERIC if a.shape == HELD_OUT else a.shape, rng.random(), (0.4, 0.6, 0.75))


def fit_image_text(name: str, model, pix: torch.Tensor, loss_fn, args, seed_offset: int, report) -> None:
    """The CLIP/BLIP training loop: random batches of pixel values (h-flipped with p = .5), ``loss_fn(idx, x, g)``,
    AdamW with warmup + cosine over ``--<name>-steps`` (or the ``--<name>-minutes`` box)."""
    bs, lr = getattr(args, f"{name}_bs"), getattr(args, f"{name}_lr")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(args.seed + seed_offset)
    box, losses = Box(getattr(args, f"{name}_minutes"), getattr(args, f"{name}_steps")), []
    while not box.done():
        for pg in opt.param_groups:
            pg["lr"] = lr * warmup_cosine(box.frac(), box.step, 50)
        idx = torch.randint(0, len(pix), (bs,), generator=g)
        x = pix[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = loss_fn(idx, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        box.step += 1
        if box.step % 50 == 0:
            log(f"{name} step {box.step} loss {np.mean(losses[-50:]):.4f} ({box.step * bs / box.elapsed():.1f} img/s)")
    model.eval().requires_grad_(False)
    report[name] = dict(steps=box.step, batch_size=bs, wall_s=round(box.elapsed(), 1),
                        final_loss=round(float(np.mean(losses[-50:])), 4),
                        params=sum(p.numel() for p in model.parameters()))
    log(f"{name} done", report[name])


def pixel_values(proc, imgs) -> torch.Tensor:
    return torch.cat([proc(images=imgs[i:i + 500], return_tensors="pt").pixel_values for i in range(0, len(imgs), 500)])


def train_clip(imgs, attrs, args, report):
    model, proc = tiny.build_tiny_clip(seed=args.seed)
    rng = random.Random(args.seed + 4)
    K = 8
    caps = [[clip_caption(a, rng) for _ in range(K)] for a in attrs]
    uniq = sorted({c for cs in caps for c in cs})
    cidx = {c: j for j, c in enumerate(uniq)}
    cap_ids = torch.tensor([[cidx[c] for c in cs] for cs in caps])
    tk = proc.tokenizer(uniq, padding=True, return_tensors="pt")

    def loss_fn(idx, x, g):  # symmetric InfoNCE; duplicate captions in a batch are one text (multi-positive)
        ci = cap_ids[idx, torch.randint(0, K, (len(idx),), generator=g)]
        u, inv = torch.unique(ci, return_inverse=True)
        logits = model(input_ids=tk.input_ids[u], attention_mask=tk.attention_mask[u], pixel_values=x).logits_per_image
        l_img = F.cross_entropy(logits, inv)
        pos = (inv[None, :] == torch.arange(len(u))[:, None]).float()  # [U, B]
        l_txt = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
        return (l_img + l_txt) / 2

    fit_image_text("clip", model, pixel_values(proc, imgs), loss_fn, args, 5, report)
    return model, proc


# ----------------------------------------------------------------------------- (d) BLIP
def train_blip(imgs, attrs, args, report):
    model, proc = tiny.build_tiny_blip(seed=args.seed, size="base")
    caps = [caption(a, GENERIC if a.shape == HELD_OUT else None) for a in attrs]
    tk = proc.tokenizer(caps, padding=True, return_tensors="pt")
    ids = tk.input_ids.clone()
    ids[:, 0] = model.config.text_config.bos_token_id  # BLIP decodes from [DEC] (as generate() does)
    labels = ids.masked_fill(tk.attention_mask == 0, -100)

    def loss_fn(idx, x, g):  # teacher-forced LM loss
        return model(pixel_values=x, input_ids=ids[idx], attention_mask=tk.attention_mask[idx], labels=labels[idx]).loss

    fit_image_text("blip", model, pixel_values(proc, imgs), loss_fn, args, 6, report)
    return model, proc


# ----------------------------------------------------------------------------- (e) judge
def train_judge(x_u8, attrs, args, report):
    from augment_dagster.config import ClassifierModelConfig, TrainingConfig
    from augment_dagster.training.backbones import save_classifier
    from augment_dagster.training.loop import train_classifier

    t0 = time.time()
    y = torch.tensor([SHAPES.index(a.shape) for a in attrs])
    x = x_u8.float() / 255.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + 7))
    nv = max(1, min(300, len(x) // 10))
    val, tr = perm[:nv], perm[nv:]
    cfg = TrainingConfig(epochs=args.judge_epochs, steps_per_epoch=100, batch_size=64, lr=2e-3)
    res = train_classifier(x[tr], y[tr], x[val], y[val], len(SHAPES), cfg, ClassifierModelConfig(),
                           seed=args.seed, device="cpu")
    data = save_classifier(res.model, {"classes": list(SHAPES)})
    report["judge"] = dict(epochs=args.judge_epochs, wall_s=round(time.time() - t0, 1), val_acc=round(res.best_val_acc, 4),
                           classes=list(SHAPES), params=sum(p.numel() for p in res.model.parameters()))
    log("judge done", report["judge"])
    return data


# ----------------------------------------------------------------------------- (f) tiny-pretrained backbone
def _linear_probe(feats_tr, y_tr, feats_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression

    f = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)  # noqa: E731
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(f(feats_tr), y_tr)
    return float((clf.predict(f(feats_te)) == y_te).mean())


def backbone_probe_evidence(model, per_class_train: int = 16, per_class_test: int = 20, shots=(2, 4, 16)) -> dict:
    """Linear-probe accuracy (L2-normalised features, LogisticRegression C=1) of ``model``'s features: fit on the
    first K images per class of the demo's *train* pool, scored on its *test* pool (neither is in the pretrain pool)."""
    from augment_dagster.training.loop import extract_features

    def pool(name, n):
        items = [(im, SHAPES.index(c)) for c in SHAPES for im, _ in generate_pool(name, c, n, 0, SIZE)]
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i, _ in items])).permute(0, 3, 1, 2)
        return extract_features(model, x).numpy(), np.array([y for _, y in items])

    ftr, ytr = pool("train", per_class_train)
    fte, yte = pool("test", per_class_test)
    rank = np.concatenate([np.arange(per_class_train)] * len(SHAPES))
    return {f"linear_probe_acc_{k}shot": round(_linear_probe(ftr[rank < k], ytr[rank < k], fte, yte), 4) for k in shots}


def train_backbone(x_u8, attrs, args, report) -> bytes:
    """Supervised pretraining of a TinyCNN on the pretrain pool's 5 *named* classes ("star" is held out, as in
    the text models, so the 6-class probe has one class the backbone never saw), train transform = GeNIe's weak
    RRC(0.2–1) + HFlip. Only the backbone (no head) is shipped."""
    import io

    from augment_dagster.config import ClassifierModelConfig, TrainingConfig
    from augment_dagster.training.backbones import TinyCNN
    from augment_dagster.training.loop import train_classifier

    t0 = time.time()
    names = [c for c in SHAPES if c != HELD_OUT]
    keep = [i for i, a in enumerate(attrs) if a.shape != HELD_OUT]
    y = torch.tensor([names.index(attrs[i].shape) for i in keep])
    x = x_u8[keep].float() / 255.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + 11))
    nv = max(1, min(300, len(x) // 10))
    val, tr = perm[:nv], perm[nv:]
    torch.manual_seed(args.seed + 11)
    model = TinyCNN(len(names), width=args.backbone_width)
    cfg = TrainingConfig(epochs=args.backbone_epochs, steps_per_epoch=100, batch_size=args.backbone_bs,
                         lr=args.backbone_lr, train_aug="weak")
    res = train_classifier(x[tr], y[tr], x[val], y[val], len(names), cfg, ClassifierModelConfig(),
                           seed=args.seed + 11, device="cpu", model=model)
    model = res.model.eval()
    ev = backbone_probe_evidence(model)
    torch.manual_seed(args.seed + 11)
    ev_rand = backbone_probe_evidence(TinyCNN(len(SHAPES), width=args.backbone_width).eval())
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.backbone.state_dict().items()}
    meta = {"width": args.backbone_width, "method": "supervised-5class", "classes_seen": names, "held_out": HELD_OUT,
            "epochs": args.backbone_epochs, "steps_per_epoch": 100, "batch_size": args.backbone_bs, "seed": args.seed,
            "pool": "pretrain", "pretrain_val_acc": round(res.best_val_acc, 4), "dtype": "float16"}
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "meta": meta}, buf)
    report["backbone"] = dict(**meta, wall_s=round(time.time() - t0, 1),
                              params=sum(p.numel() for p in model.backbone.parameters()),
                              probe=ev, probe_random_init=ev_rand)
    log("backbone done", report["backbone"])
    return buf.getvalue()


# ----------------------------------------------------------------------------- evidence (also used by the tests)
NAMED = [c for c in SHAPES if c != HELD_OUT]


def heldout_images(per_class: int, seed: int = 0, classes=SHAPES):
    """Real images of the demo's *test* pool (never in the pretrain pool): [(PIL, Attributes)]."""
    return [(im, a) for c in classes for im, a in generate_pool("test", c, per_class, seed, SIZE)]


def load_judge(path):
    from augment_dagster.training.backbones import load_classifier

    model, meta = load_classifier(Path(path).read_bytes())
    return model, meta["classes"]


def judge_predict(judge, images) -> list[int]:
    x = torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]))
    with torch.no_grad():
        return judge(x.permute(0, 3, 1, 2)).argmax(1).tolist()


def evidence_txt2img(core, judge, classes, per_class: int, guidance: float = 4.0, steps: int = 25, seed: int = 0,
                     prompt="a photo of a {}", concepts=None):
    """Fraction of txt2img samples of "a photo of a <class>" that the judge (6 classes) assigns to <class>."""
    from augment_dagster.models.generation import GenRequest

    reqs, want = [], []
    for c in classes:
        for k in range(per_class):
            reqs.append(GenRequest(prompt=prompt.format(c), seed=seed + k, guidance_scale=guidance,
                                   num_inference_steps=steps, concepts=concepts))
            want.append(c)
    pred = judge_predict(judge, core.generate(reqs))
    per = {c: float(np.mean([SHAPES[p] == c for p, w in zip(pred, want) if w == c])) for c in dict.fromkeys(want)}
    return float(np.mean([SHAPES[p] == w for p, w in zip(pred, want)])), per, [SHAPES[p] for p in pred]


def evidence_inversion(core, per_class: int = 4, steps: int = 25):
    """DDIM inversion (own caption, g = 1) then regeneration from z_T: relative latent error ||z0' - z0|| / ||z0||."""
    from augment_dagster.models.generation import GenRequest

    data = heldout_images(per_class, classes=NAMED)
    imgs = [im for im, _ in data]
    prompts = ["a photo of " + caption(a) for _, a in data]
    z0 = core.encode_images(imgs)
    zT = core.invert(imgs, prompts, num_steps=steps, guidance_scale=1.0)
    z0r = core.generate_latents([GenRequest(prompt=p, seed=0, init_latents=z, guidance_scale=1.0,
                                            num_inference_steps=steps) for p, z in zip(prompts, zT)])
    rel = ((z0r - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1))
    return float(rel.mean()), float(zT.std())


def evidence_clip(bundle, per_class: int = 20):
    """Top-1 rate of the correct "a photo of a <class>" among the 5 named class captions, held-out images."""
    from augment_dagster.models.clip_ops import zero_shot_probs

    data = heldout_images(per_class, classes=NAMED)
    probs = zero_shot_probs(bundle, [im for im, _ in data], [f"a photo of a {c}" for c in NAMED])
    return float(np.mean([NAMED[int(p.argmax())] == a.shape for p, (_, a) in zip(probs, data)]))


def blip_captions(bundle, images, max_new_tokens: int = 12) -> list[str]:
    model, proc = bundle.model, bundle.processor
    px = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model.generate(pixel_values=px, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    return [proc.decode(o, skip_special_tokens=True).strip() for o in out]


def evidence_blip(bundle, per_class: int = 20):
    """Greedy captions of held-out images of the named classes: rates of (shape named, colour named, either)."""
    data = heldout_images(per_class, classes=NAMED)
    caps = blip_captions(bundle, [im for im, _ in data])
    words = [set(c.lower().split()) for c in caps]
    shape = [a.shape in w for w, (_, a) in zip(words, data)]
    col = [a.colour in w for w, (_, a) in zip(words, data)]
    return (float(np.mean(shape)), float(np.mean(col)), float(np.mean([s or c for s, c in zip(shape, col)])),
            caps[:: max(1, len(caps) // 5)][:5])


def concept_eval_loss(core, images, prompts, concepts=None, n_noise: int = 4, seed: int = 0) -> float:
    """Fixed-noise eps-MSE of the UNet on ``images`` with ``prompts`` (same t and eps for every call)."""
    from diffusers import DDPMScheduler

    z0 = core.encode_images(images)
    z0 = z0.repeat(n_noise, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(50, 950, (len(z0),), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    sched = DDPMScheduler.from_config(core.pipe.scheduler.config)
    zt = sched.add_noise(z0, eps, t)
    emb = core.encode_prompts(list(prompts) * n_noise, concepts)
    with torch.inference_mode():
        pred = core.pipe.unet(zt.to(core.dtype), t, encoder_hidden_states=emb.to(core.dtype)).sample.float()
    return float(F.mse_loss(pred, eps))


def evidence_ti(bundle, core, steps: int = 200, lr: float = 5e-3, batch_size: int = 16, n_train: int = 200,
                n_eval: int = 40, init_word: str = "shape", seed: int = 0):
    """Textual inversion of the never-named "star": fixed-noise loss on held-out stars before/after."""
    from augment_dagster.stages.concepts import learn_concept

    train = [im for im, _ in generate_pool("train", HELD_OUT, n_train, seed, SIZE)]
    ev = heldout_images(n_eval, classes=[HELD_OUT])
    ev_imgs = [im for im, _ in ev]
    tok = "<star>"
    tmpl = ["a photo of a {}"]
    res = learn_concept(bundle, train, tok, init_word=init_word, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                        templates=tmpl)
    prompts = [f"a photo of a {tok}"] * len(ev_imgs)
    before = concept_eval_loss(core, ev_imgs, prompts, {tok: res.init_vector})
    after = concept_eval_loss(core, ev_imgs, prompts, {tok: res.vector})
    return before, after, res


def ti_star_fractions(core, judge, res, per_class: int, steps: int = 25) -> tuple[float, float]:
    """Fraction of "a photo of a <star>" txt2img samples (g = 4) the judge calls a star, with the token's initial
    vector and with the learned one (same seeds)."""
    out = []
    for vec in (res.init_vector, res.vector):
        _, _, preds = evidence_txt2img(core, judge, ["<star>"], per_class, guidance=4.0, steps=steps,
                                       concepts={"<star>": vec})
        out.append(float(np.mean([p == HELD_OUT for p in preds])))
    return out[0], out[1]


def run_evidence(out: Path, report: dict, args) -> None:
    import tempfile

    from augment_dagster.models.generation import GenerationCore
    from augment_dagster.models.loading import load_captioner, load_clip, load_diffusion

    ev: dict = {}
    t0 = time.time()
    cache = tempfile.mkdtemp()
    bundle = load_diffusion(str(out / "tiny-sd"), cache)
    core = GenerationCore(bundle, batch_size=50)
    judge, _ = load_judge(out / "judge.pt")
    real = heldout_images(50)
    ev["judge_acc_real_heldout"] = float(np.mean([SHAPES[p] == a.shape for p, (_, a) in zip(judge_predict(judge, [i for i, _ in real]), real)]))
    # VAE ceiling: the judge on VAE reconstructions
    rec = core.decode(core.encode_images([i for i, _ in real]))
    ev["judge_acc_vae_recon"] = float(np.mean([SHAPES[p] == a.shape for p, (_, a) in zip(judge_predict(judge, rec), real)]))
    for g in args.eval_guidance:
        acc, per, _ = evidence_txt2img(core, judge, NAMED, args.eval_per_class, guidance=g)
        ev[f"txt2img_acc_g{g:g}"] = acc
        ev[f"txt2img_per_class_g{g:g}"] = per
        log(f"txt2img g={g}: {acc:.3f} {per}")
    _, _, preds = evidence_txt2img(core, judge, ["shape"], args.eval_per_class, guidance=4.0)
    ev["txt2img_shape_star_fraction"] = float(np.mean([p == HELD_OUT for p in preds]))
    _, _, preds = evidence_txt2img(core, judge, [HELD_OUT], args.eval_per_class, guidance=4.0)
    ev["txt2img_word_star_star_fraction"] = float(np.mean([p == HELD_OUT for p in preds]))
    for st in (10, 25):
        rel, zstd = evidence_inversion(core, per_class=10, steps=st)
        ev[f"inversion_rel_latent_err_{st}"] = rel
        ev[f"inversion_zT_std_{st}"] = zstd
    log("inversion", {k: v for k, v in ev.items() if k.startswith("inversion")})
    ev["clip_top1_named"] = evidence_clip(load_clip(str(out / "tiny-clip"), cache), per_class=50)
    s, c, e, ex = evidence_blip(load_captioner(str(out / "tiny-blip"), cache), per_class=50)
    ev.update(blip_shape_rate=s, blip_colour_rate=c, blip_shape_or_colour_rate=e, blip_examples=ex)
    log("clip/blip", ev["clip_top1_named"], s, c, e, ex)
    ev["ti"] = {}
    for init in args.ti_init:
        tb = time.time()
        before, after, res = evidence_ti(bundle, core, steps=args.ti_steps, lr=args.ti_lr, init_word=init)
        r = dict(init_word=init, steps=args.ti_steps, lr=args.ti_lr, loss_before=before, loss_after=after,
                 embedding_moved_l2=float((res.vector - res.init_vector).norm()), wall_s=round(time.time() - tb, 1))
        r["star_fraction_before"], r["star_fraction_after"] = ti_star_fractions(core, judge, res, args.eval_per_class)
        ev["ti"][init] = r
        log("ti", r)
    ev["eval_wall_s"] = round(time.time() - t0, 1)
    report["evidence"] = ev


def write_training_md(out: Path, report: dict) -> None:
    def size(p):
        return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())

    sizes = {d: size(out / d) for d in ("tiny-sd", "tiny-clip", "tiny-blip")}
    for f in ("judge.pt", "tiny-backbone.pt"):
        sizes[f] = (out / f).stat().st_size if (out / f).exists() else 0
    report["sizes_bytes"] = sizes
    ev = report.get("evidence", {})
    L = ["# Tiny embedded models: how they were trained", "",
         "Generated by `scripts/train_tiny_models.py` (numbers below are copied from `training_report.json`).", "",
         "## Command(s)", ""]
    L += [f"    OMP_WAIT_POLICY=PASSIVE {c}" for c in report.get("runs", [])]
    L += ["", f"Seed {report.get('seed')}, {report.get('threads')} threads, torch {report.get('torch')}, "
          f"{report.get('per_class')} pretrain images per class x 6 classes (32 px, pool `pretrain`, disjoint from "
          "the demo pools). \"star\" never appears in a caption (replaced by \"shape\"); 10 % empty captions for the UNet.",
          "Stages given `--<stage>-steps` run that many steps (cosine LR over steps: the same weights on the same "
          "torch build and CPU); stages given only `--<stage>-minutes` are time-boxed (LR over the elapsed fraction), "
          "so their step counts depend on machine load.", "", "## Stages", "",
          "| stage | params | steps x batch | wall time | final loss |", "|---|---|---|---|---|"]
    for st in ("vae", "unet", "clip", "blip"):
        r = report.get(st)
        if r:
            loss = r.get("final_loss", r.get("final_loss_minsnr"))
            extra = f" (eps-MSE {r['final_eps_mse']})" if "final_eps_mse" in r else ""
            L.append(f"| {st} | {r['params']:,} | {r['steps']} x {r['batch_size']} | {r['wall_s'] / 60:.1f} min | {loss}{extra} |")
    if report.get("judge"):
        j = report["judge"]
        L.append(f"| judge (TinyCNN) | {j['params']:,} | {j.get('epochs', 3)} epochs x 100 x 64 | {j['wall_s'] / 60:.1f} min | val acc {j['val_acc']} |")
    if report.get("backbone"):
        b = report["backbone"]
        L.append(f"| backbone (TinyCNN w{b['width']}, 5 classes) | {b['params']:,} | {b['epochs']} epochs x 100 x "
                 f"{b['batch_size']} | {b['wall_s'] / 60:.1f} min | val acc {b['pretrain_val_acc']} |")
    if report.get("backbone"):
        b = report["backbone"]
        L += ["", "`tiny-pretrained` backbone (`tiny-backbone.pt`, `models.classifier.source: tiny-pretrained`): "
              "supervised on the pretrain pool's 5 named classes only (\"star\" held out: the backbone never saw a "
              "star label), weak transform RRC(0.2–1) + HFlip; only the backbone is shipped, in fp16. Linear probe (frozen features, L2-normalised, LogisticRegression C=1) "
              "fit on the first K images per class of the demo's train pool, scored on its test pool (120 images):", "",
              "| K per class | pretrained | random init |", "|---|---|---|"]
        for k, v in b["probe"].items():
            L.append(f"| {k.split('_')[-1]} | {v} | {b['probe_random_init'].get(k)} |")
    if report.get("vae"):
        L += ["", f"VAE scaling_factor {report['vae']['scaling_factor']}, reconstruction PSNR "
              f"{report['vae']['recon_psnr_db']} dB (first 256 pretrain images)."]
    L += ["", "## Sizes (bytes)", "", "```", json.dumps(sizes, indent=2), f"total {sum(sizes.values()):,}", "```"]
    if ev:
        L += ["", "## Evidence (held-out images: the demo's `test` pool; judge = `judge.pt`, 6-class TinyCNN)", "",
              "```", json.dumps(ev, indent=2), "```"]
    L += ["", "Raw report: `training_report.json`."]
    (out / "TRAINING.md").write_text("\n".join(L) + "\n")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "augment_dagster" / "builtin_models"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--stages", default="vae,unet,clip,blip,judge,eval",
                   help="comma list; 'unet' without 'vae' loads the VAE from <out>/tiny-sd")
    for st, mins, bs, lr in (("vae", 6, 32, 1e-3), ("unet", 20, 64, 1e-3), ("clip", 3, 128, 1e-3),
                             ("blip", 3, 64, 1e-3)):
        p.add_argument(f"--{st}-minutes", type=float, default=mins)
        p.add_argument(f"--{st}-steps", type=int, default=None, help="fixed step count (overrides minutes)")
        p.add_argument(f"--{st}-bs", type=int, default=bs)
        p.add_argument(f"--{st}-lr", type=float, default=lr)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--backbone-epochs", type=int, default=4)
    p.add_argument("--backbone-bs", type=int, default=64)
    p.add_argument("--backbone-lr", type=float, default=3e-3)
    p.add_argument("--backbone-width", type=int, default=32)
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--ti-steps", type=int, default=200)
    p.add_argument("--ti-lr", type=float, default=2e-2)
    p.add_argument("--ti-init", nargs="+", default=["shape", "circle"],
                   help="init words for the textual-inversion evidence (one run each)")
    p.add_argument("--fp16", action="store_true", help="save the SD weights in fp16 (28.9 MB -> 14.5 MB)")
    p.add_argument("--keep-fp32", default=None, help="also save the fp32 SD pipeline to this folder (to compare)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "seed": args.seed,
                    "threads": args.threads, "per_class": args.per_class, "torch": torch.__version__}
    rep_path = out / "training_report.json"
    if rep_path.exists():
        old = json.loads(rep_path.read_text())
        report = {**old, **{k: v for k, v in report.items()}, "runs": old.get("runs", []) + [report["command"]]}
    else:
        report["runs"] = [report["command"]]

    t0 = time.time()
    if set(stages) - {"eval"}:
        imgs, x_u8, attrs = make_data(args.per_class, args.seed)
        log(f"data: {len(imgs)} images in {time.time() - t0:.1f}s")

    if "vae" in stages or "unet" in stages:
        from diffusers import StableDiffusionPipeline
        if "vae" in stages:
            pipe = tiny.build_tiny_sd(seed=args.seed, size="base")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(out / "tiny-sd"), safety_checker=None,
                                                           requires_safety_checker=False)
        for m in (pipe.text_encoder,):
            m.requires_grad_(False)
        if "vae" in stages:
            lat_mean, lat_std, sf = train_vae(pipe, x_u8, args, report)
            pipe.save_pretrained(str(out / "tiny-sd"), safe_serialization=True)
        else:
            pipe.vae.requires_grad_(False)
            sf = pipe.vae.config.scaling_factor
            with torch.no_grad():
                ms, ss = [], []
                for flip in (False, True):
                    for i in range(0, len(x_u8), 256):
                        xx = to_unit(x_u8[i:i + 256])
                        post = pipe.vae.encode(xx.flip(-1) if flip else xx).latent_dist
                        ms.append(post.mean)
                        ss.append(post.std)
                lat_mean, lat_std = torch.cat(ms), torch.cat(ss)
        if "unet" in stages:
            train_unet(pipe, attrs, lat_mean, lat_std, sf, args, report)
        if args.keep_fp32:
            pipe.save_pretrained(args.keep_fp32, safe_serialization=True)
        if args.fp16:
            pipe.to(torch.float16)
        pipe.save_pretrained(str(out / "tiny-sd"), safe_serialization=True)
        log("saved", out / "tiny-sd")
        del pipe
    if "clip" in stages:
        model, proc = train_clip(imgs, attrs, args, report)
        model.save_pretrained(str(out / "tiny-clip"), safe_serialization=True)
        proc.save_pretrained(str(out / "tiny-clip"))
    if "blip" in stages:
        model, proc = train_blip(imgs, attrs, args, report)
        model.save_pretrained(str(out / "tiny-blip"), safe_serialization=True)
        proc.save_pretrained(str(out / "tiny-blip"))
    if "judge" in stages:
        (out / "judge.pt").write_bytes(train_judge(x_u8, attrs, args, report))
    if "backbone" in stages:
        data = train_backbone(x_u8, attrs, args, report)
        tmp = out / "tiny-backbone.pt.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / "tiny-backbone.pt")
    if set(stages) - {"eval"}:
        report["total_wall_s"] = round(time.time() - t0, 1)
    rep_path.write_text(json.dumps(report, indent=2))
    if "eval" in stages:
        run_evidence(out, report, args)
        rep_path.write_text(json.dumps(report, indent=2))
    write_training_md(out, report)
    log("report", json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
