"""Write model folders in the file layout the Hugging Face hub uses for Stable Diffusion 1.x, so locally built
models load exactly like a downloaded one (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``scheduler/``, and ``tokenizer/`` with ``vocab.json`` + ``merges.txt`` — the slow-tokenizer files of
``runwayml/stable-diffusion-v1-5``, no ``tokenizer.json``). Used by ``bench/realsize.py`` and the loader tests."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>"}


def clip_tokenizer_files(tok, folder: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a
    byte-level BPE ``CLIPTokenizer`` into ``folder`` (replacing what is there)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(CLIP_SPECIALS, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**CLIP_SPECIALS, "tokenizer_class": "CLIPTokenizer", "model_max_length": int(tok.model_max_length),
         "do_lower_case": True, "errors": "replace", "add_prefix_space": False}, indent=2))
    return folder


def save_sd_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """``pipe.save_pretrained(folder)`` with the tokenizer written as hub files (see the module doc)."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    clip_tokenizer_files(pipe.tokenizer, folder / "tokenizer")
    return folder
