"""Import every module of rfserve.server, rfserve.model_zoo and rfserve.kernels on the current install.

Run in the base-install venv: a module that needs a package the base install lacks fails here. The
Triton kernel modules are the one allowed exception, and only with the gpu-extra hint."""
import importlib
import pkgutil
import sys

TRITON_HINT = "the Triton kernels need the gpu extra"
failed, gpu_only = [], []
count = 0
for package in ("rfserve.server", "rfserve.model_zoo", "rfserve.kernels"):
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    for name in names:
        count += 1
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if name.startswith("rfserve.kernels.triton_") and TRITON_HINT in str(err):
                gpu_only.append(name)
                continue
            failed.append(f"{name}: {type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 — report every module, not only the first
            failed.append(f"{name}: {type(err).__name__}: {err}")
print(f"imported {count - len(failed) - len(gpu_only)} of {count} modules; "
      f"{len(gpu_only)} need the gpu extra and said so: {', '.join(gpu_only) or 'none'}")
for line in failed:
    print("  " + line)
sys.exit(1 if failed else 0)
