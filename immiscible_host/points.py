"""Patch points: one table per host program, and everything derived from it.

An adapter lists its host program's patch points once, as :class:`PatchPoint` rows. From that
table come the import hook's targets (:func:`hook_targets`), the module patcher
(:mod:`immiscible_host.patching`), the start-up check of the point the running script needs
(:func:`point_for_script`) and the installer's static ``--check`` (:func:`inspect_sources`).

Every point has a :class:`PointStatus`: ``ok``, ``absent`` (not in this version of the host: its
file is missing, e.g. a trainer that version does not ship) or ``broken`` (with the reason).
This module imports nothing heavy.
"""
from __future__ import annotations

import collections
from pathlib import Path

#: Kinds of patch point: the role each plays. Every kind but ``INLINE`` has one wrapper factory in
#: :data:`immiscible_host.wrappers.FACTORIES`.
OPTIONS = "options"                # ``f(parser, ...)``: also registers the ``--immiscible_*`` options
OPTIONS_RESULT = "options-result"  # ``f(...) -> parser``: the same, on the parser it returns
CONFIG = "config"                  # ``f(args, parser, ...) -> args`` (the config-file reader): start-up, exit 2
START_UP = "start-up"              # a call every run makes before any model loads; ``params[0]`` is the namespace
METADATA = "metadata"              # ``f(...) -> dict`` of a saved model's metadata: plus ``ss_immiscible_*``
TRACKERS = "trackers"              # ``Accelerator.init_trackers``: trackers log ``immiscible/reduction``
GUARD = "guard"                    # once per step before the optimizer: the first call checks the first draw
SD_NOISE = "sd-noise"              # a function whose first ``torch.randn_like(latents)`` is the base draw
FLOW_NOISE = "flow-noise"          # a function taking ``(latents, noise)``: ``noise`` is overwritten in place
INLINE = "inline"                  # a script function that draws ``torch.randn_like(latents)`` inline
RECORD = "record"                  # ``loss_fn(pred, target, ...) -> loss``: recorded for an A/B (``record.py``)
# Roles of a program configured by a typed config object rather than argparse (OneTrainer):
SCHEMA = "schema"                  # ``f() -> config`` declaring its fields in ``types``/``nullables``/``default_values``
RAW_CONFIG = "raw-config"          # ``from_dict(self, data, ...)``: the options' raw values checked before its casts
SCALARS = "scalars"                # ``add_scalar(self, tag, value, step)``: ``immiscible/reduction`` beside the loss
UI_FRAME = "ui-frame"              # ``f(self, master, row, ui_state, ...)`` builds a settings frame: plus the options
GENERATOR_NOISE = "generator-noise"  # ``f(..., latents, config, generator, ...)``: its first ``torch.randn(latents.shape,
#                                      generator=generator)`` is the base draw (params name those three)
SUPPORT_KINDS = (OPTIONS, OPTIONS_RESULT, CONFIG, START_UP, METADATA, TRACKERS, GUARD, SCHEMA, RAW_CONFIG, SCALARS,
                 UI_FRAME)
NOISE_KINDS = (SD_NOISE, FLOW_NOISE, INLINE, GENERATOR_NOISE)
RECORD_KINDS = (RECORD,)           # not needed by selection: a checkout without it still selects
KINDS = SUPPORT_KINDS + NOISE_KINDS + RECORD_KINDS

OK, ABSENT, BROKEN = "ok", "absent", "broken"


_POINT_FIELDS = ("name", "module", "attribute", "kind", "params", "needle", "scripts", "aliases", "patched_with",
                 "identifies", "in_host")
_POINT_DEFAULTS = ((), None, (), (), None, False, True)


class PatchPoint(collections.namedtuple("PatchPoint", _POINT_FIELDS, defaults=_POINT_DEFAULTS)):
    """One place in a host program that an adapter wraps or intercepts (immutable).

    ``module`` is an import name (``"library.train_util"``); ``aliases`` are other names the same
    code has had (an older file name). ``attribute`` may be dotted (``"Accelerator.init_trackers"``).
    ``kind`` is the point's role; its wrapper is ``immiscible_host.wrappers.FACTORIES[kind]`` (none
    for ``INLINE`` points, which are intercepted at start-up). ``params`` are parameter names the
    function must have (a ``START_UP`` point names its namespace first); ``needle`` is text its body
    must contain. ``scripts`` are the trainers that need the point (a noise point: the trainers that
    draw through it; a support point: only those trainers, e.g. a full fine-tune's own parser;
    empty: every trainer). ``patched_with`` is the host module whose import triggers the patch
    (default: ``module``). ``identifies`` marks the attribute that tells the host's module from a
    namesake of another project; every module the hook targets has exactly one. ``in_host`` is
    False for a library the host uses (accelerate): such points have no source file in the host's tree.

    (A named tuple rather than a dataclass: the start-up hook builds the table in every interpreter
    of the trainer's environment, and ``dataclasses`` costs that interpreter its ``inspect`` import.)
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == START_UP and not self.params:
            raise ValueError(f"{self.name}: a start-up point names its namespace parameter first in params")
        return self

    @property
    def trigger(self) -> str:
        """The module whose import patches this point."""
        return self.patched_with or self.module

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.module, *self.aliases)

    @property
    def files(self) -> tuple[str, ...]:
        """Source files in the host's tree, relative to its root (empty when not ``in_host``)."""
        return tuple(m.replace(".", "/") + ".py" for m in self.modules) if self.in_host else ()


class PointStatus(collections.namedtuple("PointStatus", ("state", "detail"), defaults=("",))):
    """A point's state in one host version or process: ``ok``, ``absent`` or ``broken``, and why."""

    __slots__ = ()

    @property
    def ok(self) -> bool:
        return self.state == OK

    def __str__(self) -> str:
        return self.state + (f" ({self.detail})" if self.detail and self.state != OK else "")


def ok(detail: str = "") -> PointStatus:
    return PointStatus(OK, detail)


def absent(detail: str) -> PointStatus:
    return PointStatus(ABSENT, detail)


def broken(detail: str) -> PointStatus:
    return PointStatus(BROKEN, detail)


# --------------------------------------------------------------------------- derived from a table


def hook_targets(points) -> dict[str, str]:
    """Module the import hook watches -> the attribute that identifies it as the host's own."""
    targets: dict[str, str] = {}
    for p in points:
        if p.kind != INLINE:
            targets.setdefault(p.trigger, "")
        if p.identifies:
            if targets.get(p.module):
                raise ValueError(f"{p.module} has two identifying points")
            targets[p.module] = p.attribute
    missing = [m for m, attr in targets.items() if not attr]
    if missing:
        raise ValueError(f"no identifying point for {', '.join(missing)}")
    return targets


def points_patched_with(points, module: str) -> list[PatchPoint]:
    return [p for p in points if p.kind != INLINE and p.trigger == module]


def point_for_script(points, script: str) -> PatchPoint | None:
    """The noise point a training script (``"train_network.py"``) draws its noise through."""
    for p in points:
        if p.kind in NOISE_KINDS and script in p.scripts:
            return p
    return None


def point_of_kind(points, kind: str) -> PatchPoint:
    """The table's one point of ``kind`` (the guard, say); ``ValueError`` if there is not exactly one."""
    found = [p for p in points if p.kind == kind]
    if len(found) != 1:
        raise ValueError(f"a table needs exactly one {kind} point, found {len(found)}")
    return found[0]


def needed_points(points, scripts) -> set[str]:
    """Names of the points a checkout with trainer ``scripts`` needs: support points every trainer
    uses, and every point (noise or support) of a shipped trainer."""
    scripts = set(scripts)
    return {p.name for p in points
            if (p.kind in SUPPORT_KINDS and not p.scripts) or scripts.intersection(p.scripts)}


def check_source(point: PatchPoint, params, source: str | None) -> PointStatus:
    """Whether a callable with parameter names ``params`` and ``source`` fits ``point``."""
    missing = [p for p in point.params if p not in params]
    if missing:
        return broken(f"parameters {missing} missing")
    if point.needle and source is not None and point.needle not in source:
        return broken(f"no `{point.needle}` in its body")
    return ok()


# --------------------------------------------------------------------------- static check (installer)


def mangled(owner: str, name: str) -> str:
    """The name Python stores a class's private ``__name`` under (``_Owner__name``); others as given."""
    if name.startswith("__") and not name.endswith("__"):
        return f"_{owner.lstrip('_')}{name}"
    return name


def _find_def(tree, attribute: str):
    import ast

    body = tree.body
    node = None
    for part in attribute.split("."):
        owner = node.name if isinstance(node, ast.ClassDef) else ""
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and part in (n.name, mangled(owner, n.name))), None)
        if node is None:
            return None
        body = node.body
    return node


def inspect_point(root: Path, point: PatchPoint, cache: dict | None = None) -> PointStatus:
    """The point read statically from the host's tree at ``root`` (nothing is imported).

    The first of ``point.files`` that defines the attribute is used; a point none of whose files
    exists is ``absent`` (that version does not ship it). ``ok``'s detail is ``file:line``.
    """
    import ast  # here, not at module level: the start-up hook imports this module in every interpreter

    cache = {} if cache is None else cache
    present = []
    for rel in point.files:
        if rel not in cache:
            try:
                src = (root / rel).read_text(encoding="utf-8")
                cache[rel] = (src, ast.parse(src))
            except FileNotFoundError:
                cache[rel] = None
            except (OSError, SyntaxError, ValueError) as exc:
                cache[rel] = (None, exc)
        if cache[rel] is None:
            continue
        present.append(rel)
        src, tree = cache[rel]
        if src is None:
            return broken(f"{rel}: {tree}")
        node = _find_def(tree, point.attribute)
        if node is None:
            continue
        params = ([a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                  if not isinstance(node, ast.ClassDef) else [])
        status = check_source(point, params, ast.get_source_segment(src, node) or "")
        return ok(f"{rel}:{node.lineno}") if status.ok else broken(f"{rel}:{node.lineno}: {status.detail}")
    if present:
        return broken(f"no function {point.attribute} in {' or '.join(present)}")
    return absent(f"{' / '.join(point.files)} not in this version")


def inspect_sources(root: Path, points) -> list[tuple[PatchPoint, PointStatus]]:
    """:func:`inspect_point` for every point that lives in the host's tree."""
    cache: dict = {}
    return [(p, inspect_point(root, p, cache)) for p in points if p.in_host]
