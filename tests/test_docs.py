"""Every ``Usage::`` block in curvi's docstrings runs as written."""

import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

MODULES = [
    "curvi.model",
    "curvi.hessian",
    "curvi.arrowhead",
    "curvi.repair",
    "curvi.modes",
    "curvi.guides",
    "curvi.posterior",
    "curvi.fit",
    "curvi.marginal",
    "curvi.mle",
    "curvi.datasets",
    "curvi.demo",
    "curvi.guide_moments",
    "curvi.taylor_cv",
    "curvi.leave_one_out",
    "curvi.diagnostics",
    "curvi.natural_gradient",
    "curvi.flows",
    "curvi.eigen",
    "curvi.laplace_newton",
    "curvi.checks",
    "curvi.tensor_ops",
    "curvi.hidden_sites",
    "curvi.unit_split",
    "curvi.quadrature",
    "curvi.particles",
    "curvi.psis",
    "curvi.factors",
    "curvi.sparse_cholesky",
    "curvi.sparse_hessian",
    "curvi.sparse_laplace",
    "curvi.factor_guide",
    "curvi.formula",
    "curvi.glmm",
    "curvi.glmm_fit",
    "curvi.arviz",
    "curvi.plots",
    "curvi.compositional",
    "curvi.model_curvature",
    "curvi.distributed",
]


def usage_blocks(doc):
    lines = doc.expandtabs().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Usage::":
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow)
        yield textwrap.dedent("\n".join(block))


def documented_objects(module):
    yield module.__name__, module
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                member = getattr(member, "fget", member)
                if inspect.isfunction(member) and member.__doc__:
                    yield f"{module.__name__}.{name}.{attr}", member


EXAMPLES = [
    pytest.param(module_name, code, id=f"{qualname}#{i}")
    for module_name in MODULES
    for qualname, obj in documented_objects(importlib.import_module(module_name))
    for i, code in enumerate(usage_blocks(obj.__doc__ or ""))
]


def test_there_are_examples():
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("module_name, code", EXAMPLES)
def test_usage_example_runs(module_name, code):
    namespace = dict(vars(importlib.import_module(module_name)))
    namespace["torch"] = torch
    exec(compile(code, f"<{module_name} usage>", "exec"), namespace)


def readme_blocks():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = readme_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "<README.md>", "exec"), {})
