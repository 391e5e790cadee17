"""Render the hook specifications as a reference (``pycluster hooks``, docs/hooks.md).

docs/hooks.md is generated from `pycluster.hookspecs` by ``pycluster hooks --output markdown``;
a test fails when the two differ, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import hookspecs


def hook_specs() -> list[dict[str, Any]]:
    """Every hook: name, signature, firstresult, docstring (in ``hookspecs`` source order)."""
    out = []
    for name in sorted(hookspecs.__all__, key=_source_line):
        fn = getattr(hookspecs, name)
        opts = getattr(fn, "pycluster_spec", {}) or {}
        out.append({
            "name": name,
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
        "| hook | first result wins |",
        "|---|---|",
    ]
    specs = hook_specs()
    for s in specs:
        lines.append(f"| [`{s['name']}`](#{s['name']}) | {'yes' if s['firstresult'] else ''} |")
    for s in specs:
        # A fragment (the annotations name classes it does not import): compiled, not run, by
        # the documentation test.
        lines += ["", f"## {s['name']}", "", "<!-- fragment -->", "```python",
                  f"def {s['signature']}: ...", "```", "", s["doc"]]
    return "\n".join(lines) + "\n"
