"""Class ids and class words (no torch, no Dagster).

A dataset names its classes by *ids*: imagefolder folder names ("001.Black_footed_Albatross", "n01532829"),
``ClassLabel`` names of a Hugging Face dataset, or the built-in shapes. Prompts, captions, LLM requests, reports
and exports need *words*. The manifests keep both: ``class_id`` (the id) and ``label`` (the words, what every
stage uses as the class's text).

* ``dataset.class_names`` maps ids to words: a mapping, or a file of ``id<TAB>words`` lines as ImageNet's
  ``words.txt`` (``n01532829<TAB>house finch, linnet, Carpodacus mexicanus``: the first synonym is used).
  It must name every class of the dataset; a file may name more.
* Without it an id is its own word, cleaned for imagefolder trees: a leading ``NNN.`` index is stripped and
  ``_`` becomes a space ("001.Black_footed_Albatross" -> "Black footed Albatross"). The built-in shapes'
  ids are words already and stay exactly as they are.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..config import ConfigError

_INDEX_RE = re.compile(r"^\d+\.\s*(?=[^\d\s])")


def default_word(class_id: str) -> str:
    """The documented cleanup of an imagefolder class name: strip a leading 'NNN.' index, '_' -> space."""
    word = _INDEX_RE.sub("", class_id).replace("_", " ")
    word = " ".join(word.split())
    return word or class_id


def read_class_names(spec: dict[str, str] | str, key: str = "dataset.class_names") -> dict[str, str]:
    """id -> words from a mapping or an ``id<TAB>words`` file (first comma-separated synonym)."""
    if isinstance(spec, dict):
        return {str(k): str(v).strip() for k, v in spec.items()}
    p = Path(spec).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {p} not found; give a mapping or a file of 'id<TAB>words' lines") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {p} ({type(e).__name__}: {e}); it must be a UTF-8 text file of "
                          "'id<TAB>words' lines") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            raise ConfigError(f"{key}: {p} line {n} has no words ({line.strip()[:60]!r}); write 'id<TAB>words'")
        out[parts[0].strip()] = parts[1].split(",")[0].strip()
    return out


def class_words(ids: list[str], spec: dict[str, str] | str | None, clean: bool) -> dict[str, str]:
    """id -> word for every class id. A mapping that misses a class, or two classes with the same words, is a
    ConfigError naming them."""
    from .imagefolder import DatasetError, check_class_name

    if spec is None:
        words = {i: (default_word(i) if clean else i) for i in ids}
    else:
        mapping = read_class_names(spec)
        missing = [i for i in ids if i not in mapping]
        if missing:
            where = f"file {spec}" if isinstance(spec, str) else "the mapping"
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ConfigError(f"dataset.class_names: {where} has no words for class {', '.join(map(repr, missing[:5]))}{more}; "
                              f"add {'a line' if isinstance(spec, str) else 'an entry'} for each class id")
        words = {i: mapping[i] for i in ids}
    for i, w in words.items():
        try:
            check_class_name(w, f"the words of class {i!r}")
        except DatasetError as e:
            raise ConfigError(f"dataset.class_names: {str(e).replace('rename the folder', 'give that class other words')}") from None
    seen: dict[str, str] = {}
    for i, w in words.items():
        if w.casefold() in seen:
            raise ConfigError(f"dataset.class_names: classes {seen[w.casefold()]!r} and {i!r} both have the words {w!r}; "
                              "give them distinct words in dataset.class_names")
        seen[w.casefold()] = i
    return words


def read_class_list(spec: list[str] | str, key: str) -> list[str]:
    """A list of class ids, or a file with one id per line (text after the first whitespace is ignored)."""
    if isinstance(spec, list):
        return [str(x) for x in spec]
    p = Path(spec).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read the class list {p} ({type(e).__name__}); give a list of class ids or a "
                          "UTF-8 file with one id per line") from None
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def class_split_of(ids: list[str], class_split) -> dict[str, str]:
    """id -> 'train'|'val'|'test' for a class-split benchmark; every dataset class must be in exactly one list and
    every class of the evaluated list must exist (ConfigError naming them otherwise); classes of the other lists may
    be absent from the dataset."""
    lists = {name: read_class_list(getattr(class_split, name), f"dataset.class_split.{name}") for name in ("train", "val", "test")}
    where: dict[str, str] = {}
    for name, lst in lists.items():
        for c in lst:
            if c in where:
                raise ConfigError(f"dataset.class_split: class {c!r} is in both {where[c]} and {name}; the lists must be disjoint")
            where[c] = name
    if not lists[class_split.evaluate]:
        raise ConfigError(f"dataset.class_split.{class_split.evaluate} is empty: list the classes to evaluate on")
    known = set(ids)
    # the evaluated classes must all be there; the others may be absent (e.g. only the test classes were downloaded)
    absent = [c for c in lists[class_split.evaluate] if c not in known]
    if absent:
        raise ConfigError(f"dataset.class_split.{class_split.evaluate} lists class(es) not in the dataset: "
                          f"{', '.join(map(repr, absent[:5]))}{' …' if len(absent) > 5 else ''}; the dataset has "
                          f"{len(known)} classes (e.g. {sorted(known)[:3]})")
    unlisted = [i for i in ids if i not in where]
    if unlisted:
        raise ConfigError(f"dataset.class_split: class(es) {', '.join(map(repr, unlisted[:5]))}"
                          f"{' …' if len(unlisted) > 5 else ''} are in no list; add each to train, val or test")
    return where


def evaluation_labels(df: pd.DataFrame) -> list[str]:
    """The class words (``label``) an evaluation draws from: the classes of the experiment's evaluation class list
    for a class-split benchmark (rows with ``class_split`` == ``evaluate``; the few-shot split holds only those),
    else every class of the manifest's train role (or of the whole manifest)."""
    rows = df
    if "class_split" in df.columns and "class_evaluated" in df.columns:
        rows = df[df["class_evaluated"].astype(bool)]
    if "role" in rows.columns and (rows["role"] == "train").any():
        rows = rows[rows["role"] == "train"]
    return sorted(rows["label"].astype(str).unique())
