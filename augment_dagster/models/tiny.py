"""Tiny offline models with the structure of the real ones (ENVIRONMENT.md §2-3, TINY_MODELS.md):
a Stable-Diffusion pipeline (AutoencoderKL + UNet2DConditionModel + CLIP text encoder + offline BPE tokenizer +
DDIM scheduler), a BLIP captioner and a CLIP model. Random weights, deterministic from a seed."""
from __future__ import annotations

import json

TINY_RESOLUTION = 32

# words that become whole BPE tokens (the rest splits into characters, never UNK)
CORPUS_WORDS = (
    "a photo of picture the an circle square triangle star cross ring shape red green blue yellow purple orange white black "
    "striped checkered dotted plain gradient noise background on at night day in with near under small large bright dark"
).split()

SD_CONFIGS = {
    "small": dict(text_hidden=32, text_inter=64, text_layers=2, text_heads=4, vae_channels=(16, 32, 64), vae_groups=8,
                  unet_channels=(32, 64), unet_layers=1, unet_groups=8, head_dim=8),
    "base": dict(text_hidden=64, text_inter=128, text_layers=2, text_heads=4, vae_channels=(32, 64, 128), vae_groups=16,
                 unet_channels=(64, 128), unet_layers=2, unet_groups=32, head_dim=4),
}


def build_tokenizer(corpus_words=CORPUS_WORDS):
    """An offline CLIP tokenizer: byte-level alphabet (never UNK) + BPE merges trained on a small corpus."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    if corpus_words:
        tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        corpus = [" ".join(corpus_words)] * 20 + list(corpus_words) * 5
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=len(vocab) + 400, end_of_word_suffix="</w>",
                                                             initial_alphabet=alphabet, show_progress=False))
        for m in json.loads(tok.to_str())["model"]["merges"]:
            a, b = m if isinstance(m, list) else m.split(" ")
            if a in vocab and b in vocab and a + b not in vocab:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sd(seed: int = 0, size: str = "small"):
    """A random-weight StableDiffusionPipeline for 32 px images (VAE factor 4 → 4×8×8 latents)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    c = SD_CONFIGS[size]
    torch.manual_seed(seed)
    tok = build_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=c["text_hidden"], intermediate_size=c["text_inter"],
                                      num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                                      max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    n = len(c["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=c["vae_channels"],
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=4, norm_num_groups=c["vae_groups"], layers_per_block=1, sample_size=TINY_RESOLUTION)
    unet = UNet2DConditionModel(sample_size=TINY_RESOLUTION // 4, in_channels=4, out_channels=4,
                                layers_per_block=c["unet_layers"], block_out_channels=c["unet_channels"],
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=c["text_hidden"], attention_head_dim=c["head_dim"], norm_num_groups=c["unet_groups"])
    # scale latents to ~unit std (ENVIRONMENT.md: random VAEs give tiny latents)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(8, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g) * 2 - 1
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()/")
    words = sorted(set(CORPUS_WORDS))
    toks = specials + chars + ["##" + ch for ch in chars] + words
    vocab = {t: i for i, t in enumerate(dict.fromkeys(toks))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_tiny_blip(seed: int = 0):
    """A random-weight BLIP captioner (BlipForConditionalGeneration + BlipProcessor) for 32 px images."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    btok = build_bert_tokenizer()
    tid = btok.convert_tokens_to_ids
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(btok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, bos_token_id=tid("[DEC]"), sep_token_id=tid("[SEP]"),
                         eos_token_id=tid("[SEP]"), pad_token_id=tid("[PAD]")),
        vision_config=dict(hidden_size=32, image_size=TINY_RESOLUTION, patch_size=8, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64),
        projection_dim=32)
    model = BlipForConditionalGeneration(cfg).eval()
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}),
                         tokenizer=btok)
    return model, proc


def build_tiny_clip(seed: int = 0):
    """A random-weight CLIPModel + CLIPProcessor (offline tokenizer) for 32 px images."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_RESOLUTION, patch_size=8),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": TINY_RESOLUTION},
                                                               crop_size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}),
                         tokenizer=tok)
    return model, proc
