"""Weight conversion as a table of name swaps.

A `Rule` pairs an mmlm tensor name with the name (or names) it has in another format. `{i}` stands for a
layer index. Several names on the other side are concatenated along dim 0 into one mmlm tensor (separate
q, k, v projections -> one fused qkv); `transpose` marks formats that store a projection as (in, out).
Going to mmlm names, the tensors may also be lazy file tensors (`weights.FileTensor`): a fused one then
becomes a `weights.RowStack` that the low-memory load fills in place, part by part.
The same table converts both ways, and both ways are strict: a tensor that no rule claims, or a rule
with no tensor, is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..weights import RowStack, is_lazy


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str | tuple[str, ...]
    transpose: bool = False

    @property
    def their_names(self) -> tuple[str, ...]:
        return (self.theirs,) if isinstance(self.theirs, str) else self.theirs


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def layer_indices(template: str, names: Iterable[str]) -> list[str | None]:
    """Layer indices present in `names` for `template` ([None] when it has no `{i}`)."""
    if "{i}" not in template:
        return [None]
    pat = _pattern(template)
    found = {m.group("i") for n in names if (m := pat.match(n))}
    return sorted(found, key=int)


def fill(template: str, i: str | None) -> str:
    return template if i is None else template.replace("{i}", i)


def cat_rows(parts: list) -> Any:
    """Tensors joined along dim 0: torch.cat, or an unread RowStack when they are lazy file tensors."""
    if len(parts) == 1:
        return parts[0]
    return RowStack(tuple(parts)) if any(is_lazy(p) for p in parts) else torch.cat(parts, dim=0)


def rename(sd: dict[str, torch.Tensor], rules: list[Rule], direction: str, source: str,
           ignore: Callable[[str], bool] = lambda name: False,
           split_sizes: Callable[[Rule, torch.Tensor], list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Apply `rules` to state dict `sd`.

    direction "to_ours" reads their names and writes ours; "to_theirs" the reverse. Tensors for which
    `ignore(name)` is true (non-persistent buffers some formats save) are dropped. `split_sizes` gives
    the row split of a fused tensor going back to several names (equal parts by default).
    """
    if direction not in ("to_ours", "to_theirs"):
        raise ValueError(direction)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        src_templates = rule.their_names if direction == "to_ours" else (rule.ours,)
        for i in layer_indices(src_templates[0], sd.keys()):
            src = [fill(t, i) for t in src_templates]
            if not all(s in sd for s in src):
                if any(s in sd for s in src):
                    missing = [s for s in src if s not in sd]
                    raise KeyError(f"{source}: incomplete tensor group, missing {missing}")
                continue
            used.update(src)
            if direction == "to_ours":
                t = cat_rows([sd[s] for s in src])
                out[fill(rule.ours, i)] = t.t() if rule.transpose else t
            else:
                t = sd[src[0]]
                names = [fill(n, i) for n in rule.their_names]
                if len(names) == 1:
                    parts = [t]
                else:
                    sizes = split_sizes(rule, t) if split_sizes else [t.shape[0] // len(names)] * len(names)
                    parts = list(t.split(sizes, dim=0))
                for n, p in zip(names, parts):
                    out[n] = (p.t() if rule.transpose else p).contiguous()
    left = sorted(k for k in sd if k not in used and not ignore(k))
    if left:
        raise KeyError(f"{source}: {len(left)} tensor(s) no conversion rule claims: {left[:8]}"
                       + (" ..." if len(left) > 8 else ""))
    return out
