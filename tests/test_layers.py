"""Imports point down: no circles between modules, the building blocks (models, losses, nn, data, flow,
encoders, checkpoint, interop, config, rundir, steps) import no command or training loop, the modules the commands share
(train, pipeline, runs, workspace, ...) import no command, and command modules do not import each other
(quickstart and compare, which orchestrate, excepted); the networks (models, losses) take nothing from data/
but its pixel constants. The cli package is on top: nothing imports it, and its command-group modules import
only cli/common.py of their package. Every import counts, function-level ones included: a lazy import still
ties the two modules together."""

import ast

from conftest import ROOT

PKG = "flatdino_cli"
# the floor below the commands: these import nothing from the modules in COMMANDS_AND_LOOP
BLOCKS = ("models", "losses", "nn", "data", "flow", "encoders", "checkpoint", "interop", "config", "config_yaml",
          "rundir", "steps")
COMMANDS_AND_LOOP = ("stages", "train", "extract", "sample", "reconstruct", "quickstart", "compare", "cli", "analysis",
                     "export", "info", "pipeline", "runs", "workspace")
COMMANDS = ("extract", "sample", "reconstruct", "quickstart", "compare", "stages", "analysis", "export", "info")
ORCHESTRATORS = ("quickstart", "compare")  # commands made of the other commands
# what the commands share, between them and the blocks: these import no command
SHARED = ("train", "pipeline", "runs", "workspace", "classes", "metrics")
# the top floor: the Typer declarations (cli/__init__.py gathers the group modules, which share cli/common.py;
# cli/__main__.py runs it)
CLI, CLI_TOP, CLI_SHARED = "cli", (f"{PKG}.cli", f"{PKG}.cli.__main__"), (f"{PKG}.cli.common",)


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """Dotted module name -> (parsed source, is package __init__)."""
    mods = {}
    for f in sorted((ROOT / PKG).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (ast.parse(f.read_text(), str(f)), is_pkg)
    return mods


def _owner(name: str, mods) -> str | None:
    """The module of the package that `name` (a module or a name inside one) lives in."""
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any level of the file."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, (tree, is_pkg) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: climb from this module's package
                    base = mod.split(".")[: None if is_pkg else -1]
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                owner = _owner(t, mods) if t.split(".")[0] == PKG else None
                if owner and owner != mod:
                    graph[mod].add(owner)
    return graph


def _short(mod: str) -> str:
    return mod[len(PKG) + 1:] if mod.startswith(PKG + ".") else mod


def _in(mod: str, names) -> bool:
    """Module `mod` is one of the top-level modules or packages in `names`."""
    return _short(mod).split(".")[0] in names and mod != PKG


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(_short(c) for c in comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_lazy_and_relative_imports():
    """The parser must see what the rules are about, or the tests below pass vacuously."""
    graph = _import_graph()
    assert f"{PKG}.stages.dit" in graph[f"{PKG}.cli.train"]  # function-level import inside a command
    assert f"{PKG}.cli.train" in graph[f"{PKG}.cli"]  # `from pkg import sub` is the submodule
    assert f"{PKG}.nn.norm" in graph[f"{PKG}.nn.attention"]  # relative import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_building_blocks_import_no_command_or_training_loop():
    graph = _import_graph()
    bad = sorted(f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if _in(m, BLOCKS)
                 for d in deps if _in(d, COMMANDS_AND_LOOP))
    assert not bad, "building blocks import a command or the training loop: " + ", ".join(bad)


def test_commands_do_not_import_each_other():
    graph = _import_graph()
    top = lambda m: _short(m).split(".")[0]  # noqa: E731
    # modules of one command package (analysis/noise -> analysis/common) are parts of one floor
    bad = sorted(f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if _in(m, COMMANDS) and top(m) not in ORCHESTRATORS
                 for d in deps if _in(d, COMMANDS) and top(d) != top(m))
    assert not bad, "command modules import each other: " + ", ".join(bad)


def test_shared_modules_import_no_command():
    graph = _import_graph()
    bad = sorted(f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if _in(m, SHARED)
                 for d in deps if _in(d, COMMANDS))
    assert not bad, "modules the commands share import a command: " + ", ".join(bad)


def test_cli_is_on_top():
    graph = _import_graph()
    below = sorted(f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if not _in(m, (CLI,))
                   for d in deps if _in(d, (CLI,)))
    assert not below, "modules import the cli: " + ", ".join(below)
    groups = [m for m in graph if _in(m, (CLI,)) and m not in CLI_TOP + CLI_SHARED]
    assert f"{PKG}.cli.train" in groups
    sideways = sorted(f"{_short(m)} -> {_short(d)}" for m in groups for d in graph[m]
                      if _in(d, (CLI,)) and d not in CLI_SHARED)
    assert not sideways, "cli group modules import each other or the app: " + ", ".join(sideways)


# all that the networks take from data/: the ImageNet pixel constants (the pixel decoder and the DINO
# discriminator undo or apply the encoder's normalisation); store checks live in data/shapes.py
NETWORKS = ("models", "losses")
NETWORKS_FROM_DATA = {"IMAGENET_MEAN", "IMAGENET_STD"}


def test_networks_take_nothing_but_the_pixel_constants_from_data():
    seen, bad = set(), []
    for f in sorted(p for d in NETWORKS for p in (ROOT / PKG / d).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[:2] == [PKG, "data"]:
                names = {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names if a.name.split(".")[:2] == [PKG, "data"]}
            else:
                continue
            seen |= names & NETWORKS_FROM_DATA
            bad += [f"{f.relative_to(ROOT / PKG)}: {n}" for n in sorted(names - NETWORKS_FROM_DATA)]
    assert seen, "the check sees no import from data/ at all: it would pass vacuously"
    assert not bad, "models/losses import data code (store checks belong in data/): " + ", ".join(bad)
