"""The table `flatdino workspace` prints."""

from __future__ import annotations

from flatdino_cli.utils import human_bytes
from flatdino_cli.workspace.index import index
from flatdino_cli.workspace.paths import root
from flatdino_cli.workspace.settings import settings


def listing() -> str:
    """The table `flatdino workspace` prints: newest first, with where each came from."""
    ws = root()
    entries = index(ws)
    lines = [f"workspace {ws}" + (f"  (settings: {', '.join(f'{k}={v}' for k, v in settings(ws).items())})"
                                  if settings(ws) else "")]
    if not entries:
        lines.append("  nothing yet: start with `flatdino quickstart` (toy data) or `flatdino extract IMAGES`")
        return "\n".join(lines)
    names = {rel: rel + (" (+val)" if e.get("val") else "") for rel, e in entries.items()}
    w = max(map(len, names.values()))
    lines.append(f"  {'path':{w}s} {'stage':8s} {'preset':14s} {'progress':>8s} {'metric':>24s} {'size':>9s}  from")
    for rel, e in entries.items():
        metric = f"{e['metric'][0]} {e['metric'][1]:.4g}" if e.get("metric") and e["metric"][1] is not None else ""
        if e.get("quality"):  # a DiT's evaluations: the latest fd_rep, and the best when it was earlier
            q = e["quality"]
            metric = f"fd_rep {q['last']:.3g}" + (f" (best {q['best']:.3g})" if q["best"] < q["last"] else "")
        progress = "done" if e.get("finished") else f"{e['progress']:.0%}"
        lines.append(f"  {names[rel]:{w}s} {e['stage']:8s} {str(e.get('preset') or ''):14s} {progress:>8s} "
                     f"{metric:>24s} {human_bytes(e['size']):>9s}  {' + '.join(e['from']) if e['from'] else '-'}")
    return "\n".join(lines)
