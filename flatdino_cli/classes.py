"""Class names: ImageNet's (torchvision's bundled list) or a store's own, and `-c/--class` parsing."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import re
from pathlib import Path
from typing import Sequence

from flatdino_cli.errors import UserError

__all__ = ["imagenet_class_names", "resolve_classes", "class_label", "class_plan"]

@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in id order: torchvision's bundled list, read from its source
    file (importing torchvision.models takes seconds); [] without torchvision."""
    spec = importlib.util.find_spec("torchvision")
    meta = Path(spec.origin).parent / "models" / "_meta.py" if spec and spec.origin else None
    try:
        for node in ast.parse(meta.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES":
                return list(ast.literal_eval(node.value))
    except (AttributeError, OSError, SyntaxError, ValueError):
        pass
    try:  # a torchvision laid out differently: pay for the import
        from torchvision.models._meta import _IMAGENET_CATEGORIES  # fallback
    except ImportError:
        return []
    return list(_IMAGENET_CATEGORIES)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _lookup(name: str, names: Sequence[str]) -> list[int]:
    key = _norm(name)
    return [i for i, n in enumerate(names) if n and _norm(n) == key]


def resolve_classes(items: Sequence[str], num_classes: int, run_names: Sequence[str] = ()) -> list[int]:
    """Class ids from ids or names: the run's own names first (its latent store's class_names), then
    ImageNet's (case-insensitive, '_' = ' ') when the DiT has 1000 classes. Unknown or ambiguous names
    are one-line UserErrors with close matches."""
    imagenet = imagenet_class_names() if num_classes == 1000 else []
    out = []
    for item in items:
        item = str(item).strip()
        if item.lstrip("-").isdigit():
            c = int(item)
            if not 0 <= c < num_classes:
                raise UserError(f"--class {c}: out of range; this DiT has classes 0..{num_classes - 1}")
            out.append(c)
            continue
        for names in (run_names, imagenet):
            hits = [i for i in _lookup(item, names) if i < num_classes]
            if len(hits) > 1:  # ImageNet's "Cardigan" (corgi) and "cardigan" (sweater): exact case decides
                hits = [i for i in hits if names[i].strip() == item] or hits
            if len(hits) > 1:
                raise UserError(f"--class {item!r}: ambiguous, classes {', '.join(map(str, hits))} share that "
                                "name; pass the id")
            if hits:
                out.append(hits[0])
                break
        else:
            pool = {_norm(n): n for n in [*run_names, *imagenet] if n}
            close = [pool[k] for k in difflib.get_close_matches(_norm(item), list(pool), n=4, cutoff=0.6)]
            few = [n for n in run_names if n][:20] if len(run_names) <= 20 else []
            hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"this run's classes are {', '.join(repr(n) for n in few)}" if few
                    else "pass a class id" + ("" if pool else " (this run records no class names)"))
            raise UserError(f"--class {item!r}: unknown class name; {hint}")
    return out


def class_label(c: int, run_names: Sequence[str], num_classes: int) -> str:
    """What a grid caption says for class c: the run's name, the ImageNet name, or the id. The id is
    shown once: a folder name that already starts with it (the toy data's "00_red_circle") stands alone."""
    if c < len(run_names) and run_names[c]:
        name = run_names[c]
        lead = re.match(r"\d+", name)
        return name if lead and int(lead.group()) == c else f"{c} {name}"
    names = imagenet_class_names() if num_classes == 1000 else []
    return f"{c} {names[c]}" if c < len(names) else str(c)


def class_plan(classes: Sequence[int], n: int | None, per_class: int | None) -> list[int]:
    """Labels of the images to make, in order: `per_class` of each class, or `n` in total split into
    contiguous, balanced blocks (class k gets images [k n / K, (k+1) n / K))."""
    if not classes:
        raise UserError("sample: pass --class ID|NAME (repeatable) or --classes all")
    if per_class is not None and n is not None:
        raise UserError("sample: pass -n (images in total) or --per-class, not both")
    if per_class is not None:
        if per_class < 1:
            raise UserError(f"--per-class {per_class}: must be >= 1")
        return [c for c in classes for _ in range(per_class)]
    n = 16 if n is None else n
    if n < len(classes):
        raise UserError(f"-n {n}: fewer images than the {len(classes)} classes asked for; raise -n")
    return [classes[i * len(classes) // n] for i in range(n)]
