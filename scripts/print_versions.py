"""Print the versions a test run uses (CI records them in its log): python, torch, triton, transformers, ..."""

import importlib
import platform

print(f"[versions] python {platform.python_version()}", end="")
for name in ("torch", "triton", "numpy", "transformers", "huggingface_hub", "kernels", "compressed_tensors",
             "pytest", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f", {name} {getattr(module, '__version__', '?')}", end="")
    except Exception:  # not installed (or broken): say so, the tests that need it report more
        print(f", {name} -", end="")
print()
