"""Render the hook specifications as a reference (``pycluster hooks``, docs/hooks.md).

docs/hooks.md is generated from `pycluster.hookspecs` by ``pycluster hooks --output markdown``;
a test fails when the two differ, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import hookspecs


def group_of(name: str) -> str:
    """The design group of hook ``name`` (`pycluster.hookspecs.GROUPS`)."""
    for group, names in hookspecs.GROUPS.items():
        if name in names:
            return group
    return "other"


def hook_specs() -> list[dict[str, Any]]:
    """Every hook: name, group, signature, firstresult, docstring (by group, then in
    ``hookspecs`` source order)."""
    order = list(hookspecs.GROUPS)
    out = []
    for name in sorted(hookspecs.__all__, key=lambda n: (
            order.index(group_of(n)) if group_of(n) in order else len(order), _source_line(n))):
        fn = getattr(hookspecs, name)
        opts = getattr(fn, "pycluster_spec", {}) or {}
        out.append({
            "name": name,
            "group": group_of(name),
            "signature": f"{name}{inspect.signature(fn)}".replace("'", ""),
            "firstresult": bool(opts.get("firstresult")),
            "doc": inspect.getdoc(fn) or "",
        })
    return out


def _source_line(name: str) -> int:
    return inspect.getsourcelines(getattr(hookspecs, name))[1]


def render_markdown() -> str:
    """The hooks reference as Markdown."""
    lines = [
        "# Hooks reference",
        "",
        "Generated from `pycluster.hookspecs` by `pycluster hooks --output markdown`; do not edit.",
        "Implement a hook with `@pycluster.hookimpl` in a module named under the entry-point "
        "group `pycluster` (see [writing a plugin](writing-a-plugin.md)).",
        "",
        "| group | hook | first result wins |",
        "|---|---|---|",
    ]
    specs = hook_specs()
    for s in specs:
        lines.append(f"| {s['group']} | [`{s['name']}`](#{s['name']}) | "
                     f"{'yes' if s['firstresult'] else ''} |")
    group = None
    for s in specs:
        if s["group"] != group:
            group = s["group"]
            lines += ["", f"## {group[:1].upper()}{group[1:]}"]
        # A fragment (the annotations name classes it does not import): compiled, not run, by
        # the documentation test.
        lines += ["", f"### {s['name']}", "", "<!-- fragment -->", "```python",
                  f"def {s['signature']}: ...", "```", "", s["doc"]]
    return "\n".join(lines) + "\n"
