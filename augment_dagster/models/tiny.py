"""Tiny offline models with the structure of the real ones (ENVIRONMENT.md §2-3, TINY_MODELS.md):
a Stable-Diffusion pipeline (AutoencoderKL + UNet2DConditionModel + CLIP text encoder + offline BPE tokenizer +
DDIM scheduler), a BLIP captioner and a CLIP model. Random weights, deterministic from a seed; the builders
never touch the global torch RNG (they run inside ``torch.random.fork_rng``).

Nothing here downloads anything: the tokenizers are built in memory (byte-level alphabet, so never UNK).
"""
from __future__ import annotations

TINY_RESOLUTION = 32

# words that become whole BPE tokens (any other word splits into byte-level pieces, never UNK)
CORPUS_WORDS = (
    "a photo of picture the an circle square triangle star cross ring shape red green blue yellow purple orange white "
    "black striped checkered dotted plain gradient noise background on at night day in with near under small large "
    "bright dark"
).split()

# Everything that determines the random weights: it enters the tiny-random fingerprint (models.loading).
SD_CONFIGS = {
    "small": dict(text_hidden=32, text_inter=64, text_layers=2, text_heads=4, vae_channels=(16, 32, 64), vae_groups=8,
                  unet_channels=(32, 64), unet_layers=1, unet_groups=8, head_dim=8),
    "base": dict(text_hidden=64, text_inter=128, text_layers=2, text_heads=4, vae_channels=(32, 64, 128), vae_groups=16,
                 unet_channels=(64, 128), unet_layers=2, unet_groups=32, head_dim=4),
}
BLIP_CONFIGS = {
    "small": dict(text_hidden=32, text_layers=2, text_heads=4, text_inter=64, text_max_pos=64, vision_hidden=32,
                  patch=8, vision_layers=2, vision_heads=4, vision_inter=64, projection_dim=32),
    # the trained captioner (scripts/train_tiny_models.py): 4-px patches and a wider vision tower, so shapes are seen
    "base": dict(text_hidden=32, text_layers=2, text_heads=4, text_inter=64, text_max_pos=64, vision_hidden=64,
                 patch=4, vision_layers=3, vision_heads=4, vision_inter=128, projection_dim=32),
}
CLIP_CONFIG = dict(text_hidden=32, text_inter=64, text_layers=2, text_heads=4, vision_hidden=32, vision_inter=64,
                   vision_layers=2, vision_heads=4, patch=8, projection_dim=16)
BUILD_VERSION = 2  # bump when a builder changes in a way the configs above do not capture


def build_config(kind: str, size: str = "small", seed: int = 0) -> dict:
    """The JSON-able description of a tiny build (kind: 'sd' | 'blip' | 'clip'), hashed into fingerprints."""
    cfg = {"sd": SD_CONFIGS.get(size), "blip": BLIP_CONFIGS["small"], "clip": CLIP_CONFIG}[kind]
    return {"kind": kind, "size": size if kind == "sd" else None, "seed": seed, "config": cfg, "corpus": CORPUS_WORDS,
            "resolution": TINY_RESOLUTION, "version": BUILD_VERSION}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable-unicode map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges (ties broken lexicographically) that turn every corpus word into one token.

    (``tokenizers``' trainer breaks frequency ties in hash order, so its merges differ between processes.)"""
    b2u = _bytes_to_unicode()
    seqs = []
    for w in sorted(set(x.lower() for x in words if x)):
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        seqs.append(sym)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for sym in seqs:
            for a, b in zip(sym, sym[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, sym in enumerate(seqs):
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[k] = out


def build_tokenizer(corpus_words: list[str] | None = None):
    """An offline ``CLIPTokenizer``: byte-level alphabet (never UNK) + BPE merges learned on a small corpus.

    ``corpus_words=None`` uses the built-in :data:`CORPUS_WORDS` (so "a photo of a red circle" is whole-word
    tokens); ``[]`` gives a merge-free, character-level tokenizer. Deterministic: equal inputs give equal
    vocabularies in every process.
    """
    from transformers import CLIPTokenizer

    words = CORPUS_WORDS if corpus_words is None else list(corpus_words)
    alphabet = sorted(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a, b in learn_bpe_merges(words):
        if a in vocab and b in vocab and a + b not in vocab:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(tok, c: dict, hidden: str = "text_hidden") -> dict:
    return dict(vocab_size=len(tok), hidden_size=c[hidden], intermediate_size=c["text_inter"],
                num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"], max_position_embeddings=77,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_tiny_sd(seed: int = 0, size: str = "small"):
    """A random-weight ``StableDiffusionPipeline`` for 32 px images (VAE factor 4 → 4×8×8 latents).

    ``size='small'`` is for fast unit tests; ``size='base'`` has TINY_MODELS.md's widths. The VAE's
    ``scaling_factor`` is set to 1/std of its posterior-mean latents on a few random images, so scaled
    latents have ~unit std like a real SD VAE's (ENVIRONMENT.md: inversion is meaningless otherwise).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SD_CONFIGS:
        raise ValueError(f"unknown tiny SD size {size!r}; choose from {sorted(SD_CONFIGS)}")
    c = SD_CONFIGS[size]
    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(**_text_config(tok, c))).eval()
        n = len(c["vae_channels"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=c["vae_channels"],
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            latent_channels=4, norm_num_groups=c["vae_groups"], layers_per_block=1,
                            sample_size=TINY_RESOLUTION).eval()
        unet = UNet2DConditionModel(sample_size=TINY_RESOLUTION // 2 ** (n - 1), in_channels=4, out_channels=4,
                                    layers_per_block=c["unet_layers"], block_out_channels=c["unet_channels"],
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=c["text_hidden"], attention_head_dim=c["head_dim"],
                                    norm_num_groups=c["unet_groups"]).eval()
        # latents of a random VAE are tiny (std ~0.04): scale them to ~unit std, measured once here
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(8, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g) * 2 - 1
        x[4:] = torch.nn.functional.avg_pool2d(x[4:], 5, stride=1, padding=2) * 3  # smoother "images" too
        with torch.no_grad():
            std = float(vae.encode(x.clamp(-1, 1)).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / max(std, 1e-6), 6))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_bert_tokenizer():
    """An offline BERT WordPiece tokenizer for BLIP (ENVIRONMENT.md §3): specials incl. ``[DEC]`` (BLIP's bos),
    characters, ``##``-continuations and the corpus words, so no word is ever UNK."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()/")
    toks = specials + chars + ["##" + ch for ch in chars] + sorted(set(CORPUS_WORDS))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(toks))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_tiny_blip(seed: int = 0, size: str = "small"):
    """A random-weight BLIP captioner ``(BlipForConditionalGeneration, BlipProcessor)`` for 32 px images
    (``size`` 'small': patch 8, the tiny-random build; 'base': patch 4, wider vision tower, the trained one)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    c = BLIP_CONFIGS[size]
    btok = build_bert_tokenizer()
    tid = btok.convert_tokens_to_ids
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(btok), hidden_size=c["text_hidden"], num_hidden_layers=c["text_layers"],
                         num_attention_heads=c["text_heads"], intermediate_size=c["text_inter"],
                         max_position_embeddings=c["text_max_pos"], bos_token_id=tid("[DEC]"), sep_token_id=tid("[SEP]"),
                         eos_token_id=tid("[SEP]"), pad_token_id=tid("[PAD]")),
        vision_config=dict(hidden_size=c["vision_hidden"], image_size=TINY_RESOLUTION, patch_size=c["patch"],
                           num_hidden_layers=c["vision_layers"], num_attention_heads=c["vision_heads"],
                           intermediate_size=c["vision_inter"]),
        projection_dim=c["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(cfg).eval()
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}),
                         tokenizer=btok)
    return model, proc


def build_tiny_clip(seed: int = 0):
    """A random-weight ``(CLIPModel, CLIPProcessor)`` for 32 px images (patch 8) with the offline CLIP tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    c = CLIP_CONFIG
    tok = build_tokenizer()
    cfg = CLIPConfig(
        text_config=_text_config(tok, c),
        vision_config=dict(hidden_size=c["vision_hidden"], intermediate_size=c["vision_inter"],
                           num_hidden_layers=c["vision_layers"], num_attention_heads=c["vision_heads"],
                           image_size=TINY_RESOLUTION, patch_size=c["patch"]),
        projection_dim=c["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": TINY_RESOLUTION},
                                                               crop_size={"height": TINY_RESOLUTION,
                                                                          "width": TINY_RESOLUTION}),
                         tokenizer=tok)
    return model, proc
