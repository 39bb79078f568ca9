"""README.md's API listings against the code: every call written there as `moe_ext.<name>(...)`
names parameters that exist, in the order given, and every `name=<literal>` it shows equals the
real default (the listings are how users learn the defaults). Calls on `layer` are checked
against moe_ext.MoE's methods, without defaults (they show uses, not signatures)."""
import ast
import inspect
import pathlib

import pytest

import moe_ext

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    blocks, cur = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```python"):
            cur = []
        elif line.startswith("```") and cur is not None:
            blocks.append("\n".join(cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def _resolve(func):
    """-> (callable, check_defaults) for moe_ext.a.b(...) and layer.m(...) / layer(...); else None."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    parts.reverse()
    if parts[0] == "moe_ext":
        obj = moe_ext
        for p in parts[1:]:
            obj = getattr(obj, p)
        return obj, True
    if parts[0] == "layer":
        obj = moe_ext.MoE
        for p in parts[1:]:
            obj = getattr(obj, p)
        return (obj.forward if obj is moe_ext.MoE else obj), False
    return None


def _calls():
    out = []
    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and _resolve(node.func) is not None:
                out.append(node)
    return out


CALLS = _calls()


def test_readme_lists_calls():
    names = {ast.unparse(c.func) for c in CALLS}
    for name in ("moe_ext.topk_gating", "moe_ext.permute", "moe_ext.unpermute", "moe_ext.grouped_gemm",
                 "moe_ext.dispatch", "moe_ext.combine", "moe_ext.MoE", "moe_ext.MoE.from_hf",
                 "moe_ext.hf.patch_model"):
        assert name in names, f"README.md no longer shows {name}(...)"


@pytest.mark.parametrize("call", CALLS, ids=lambda c: ast.unparse(c.func))
def test_readme_call_matches_signature(call):
    fn, check_defaults = _resolve(call.func)
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    by_name = {p.name: p for p in params}
    where = ast.unparse(call)[:80]
    # Positional arguments: the README's names are the parameters' names, in order.
    for i, arg in enumerate(call.args):
        assert i < len(params), f"{where}: more positional arguments than {fn.__qualname__} takes"
        if isinstance(arg, ast.Name):
            assert arg.id == params[i].name, f"{where}: argument {i} is {params[i].name!r} in the code, not {arg.id!r}"
    for kw in call.keywords:
        assert kw.arg in by_name, f"{where}: {fn.__qualname__} has no parameter {kw.arg!r}"
        if check_defaults:
            try:
                shown = ast.literal_eval(kw.value)
            except ValueError:
                continue  # not a literal: a use, not a default
            real = by_name[kw.arg].default
            assert real is not inspect.Parameter.empty, f"{where}: {kw.arg!r} has no default in the code"
            assert shown == real and type(shown) is type(real), \
                f"{where}: README shows {kw.arg}={shown!r}, the code's default is {real!r}"


def test_readme_names_exist():
    """Every `moe_ext.a.b` README.md names resolves after a plain `import moe_ext`."""
    import re

    names = set(re.findall(r"\bmoe_ext(?:\.[A-Za-z_]\w*)+", README.read_text()))
    assert len(names) > 10
    for name in sorted(names):
        obj = moe_ext
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), f"README.md names {name}, but {part!r} is not there"
            obj = getattr(obj, part)


def test_readme_cli_flags_exist(capsys):
    """Every --flag README.md writes on a line after `moe-ext <command>` is one of that command's."""
    import re

    from moe_ext import cli

    lines = README.read_text().splitlines()
    wanted = {}
    for i, line in enumerate(lines):
        for m in re.finditer(r"moe-ext (demo|check|bench|plan)\b", line):
            text = line[m.end():]
            j = i
            while text.rstrip().endswith("\\") and j + 1 < len(lines):  # a continued shell command
                j += 1
                text += " " + lines[j]
            wanted.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert {"check", "plan"} <= {c for c, flags in wanted.items() if flags}
    for command, flags in wanted.items():
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = capsys.readouterr().out
        for flag in sorted(flags):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", help_text), \
                f"README.md shows `moe-ext {command} ... {flag}`, which `moe-ext {command} --help` does not list"
