"""The folders are the architecture: data and method know nothing of Ray, and the README's
Layout section lists exactly the modules there are."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dec_ray")
# what each plain part may not import: Ray, the Ray layer, and the layers above it
FORBIDDEN = {"data": ("ray", "dec_ray.service", "dec_ray.report", "dec_ray.method", "dec_ray.cli", "dec_ray.demo"),
             "method": ("ray", "dec_ray.service", "dec_ray.report", "dec_ray.cli", "dec_ray.demo"),
             "report": ("ray", "dec_ray.service", "dec_ray.cli", "dec_ray.demo")}


def modules(part):
    folder = os.path.join(PKG, part)
    return sorted(f for f in os.listdir(folder) if f.endswith(".py"))


def imported(path):
    """Every module an import statement names, at any depth (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_plain_parts_never_import_ray_or_the_layers_above(part):
    bad = [(f, name) for f in modules(part) for name in imported(os.path.join(PKG, part, f))
           if any(name == x or name.startswith(x + ".") for x in FORBIDDEN[part])]
    assert not bad, f"dec_ray/{part} imports what it must not: {bad}"


def test_importing_the_method_loads_no_ray():
    code = ("import sys\nimport dec_ray.data.tables, dec_ray.method.loop, dec_ray.report.analysis, "
            "dec_ray.report.inference\nprint(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_readme_layout_lists_every_module():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"^## Layout\n\n```\n(.*?)```", text, re.S | re.M).group(1)
    listed, folders = set(), {}
    for line in block.splitlines():
        indent = (len(line) - len(line.lstrip())) // 2
        names = re.findall(r"(?<![\w/.])([\w]+\.py|[\w]+/)(?=\s|$)", line.strip().split("   ")[0])
        for name in names:
            parent = "/".join(folders[i] for i in range(indent) if i in folders)
            if name.endswith("/"):
                folders = {i: f for i, f in folders.items() if i < indent}
                folders[indent] = name[:-1]
            else:
                listed.add(f"{parent}/{name}")
    present = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(PKG) for f in fs
               if f.endswith(".py") and f not in ("__init__.py", "__main__.py")}
    assert listed == present, f"README lists {sorted(listed - present)} (absent), omits {sorted(present - listed)}"
