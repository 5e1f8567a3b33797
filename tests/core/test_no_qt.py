"""The core never imports Qt (nor pyqtgraph or matplotlib): it must work on a headless GPU server."""

import subprocess
import sys

CODE = r"""
import builtins, sys
real_import = builtins.__import__
BLOCKED = ("PySide6", "PyQt5", "PyQt6", "shiboken6", "pyqtgraph", "matplotlib", "monoflow_studio")
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in BLOCKED:
        raise ImportError(f"blocked in this test: {name}")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import pkgutil, importlib
import monoflow_core
for mod in pkgutil.walk_packages(monoflow_core.__path__, "monoflow_core."):
    if mod.name.endswith("__main__"):
        continue
    importlib.import_module(mod.name)
flow = monoflow_core.build_flow(monoflow_core.FlowConfig(blocks=2))
import torch
flow.log_prob(torch.zeros(3, 2)).sum().backward()
assert not any(name.split(".")[0] in BLOCKED for name in sys.modules)
print("ok")
"""


def test_core_imports_without_qt():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
