"""How the modules of this repository import each other, and how a clone is used from its root.

Every module imports its siblings with relative imports only (``from .devices import ...``). That is the form
transformers' remote-code loader copies and runs as a package (``transformers_modules.<folder>``). A clone used
from its root (the scripts, the tests, ``from modeling_moss_tts_nano import MossTTSNanoForCausalLM``) has no
package, so this module makes one:

- ``install()`` registers the repository folder as the package ``moss_tts_nano`` and lets a top-level name
  (``import devices``) resolve to the very module object ``moss_tts_nano.devices``: one copy of each module, so
  module state, ``isinstance`` and monkeypatching agree whichever name is used. The tests' conftest calls it.
- ``adopt(namespace)`` is called by the two modules a user imports first by file name (modeling_moss_tts_nano.py,
  engine.py) before their relative imports: it installs the package and makes the module being executed its member.
- ``run_script(path)`` is called by each script (``python infer_npu.py``): it runs the script as a package module.

This file is never imported with an ``import`` statement by those modules (they use ``importlib``), so the
remote-code loader neither requires nor copies it; with a package present none of it runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
import types
from pathlib import Path
from typing import Any, MutableMapping, NoReturn, Optional

PACKAGE = "moss_tts_nano"
ROOT = Path(__file__).resolve().parent


class _RootNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``import <name>`` for a ``<name>.py`` of the repository root to ``moss_tts_nano.<name>``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if "." in fullname or fullname == __name__ or not (ROOT / f"{fullname}.py").is_file():
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(f"{PACKAGE}.{spec.name}")
        spec.loader_state = module.__spec__  # the import system overwrites __spec__ with the alias spec
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # already executed as the package member: restore its spec


_FINDER = _RootNames()


def install() -> str:
    """Register the package and the top-level aliases (idempotent); return the package name."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE, "The repository root used as a package (repo_imports.py).")
        package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        package.__spec__.submodule_search_locations = [str(ROOT)]
        package.__path__ = [str(ROOT)]
        package.__package__ = PACKAGE
        sys.modules[PACKAGE] = package
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return PACKAGE


def adopt(namespace: MutableMapping[str, Any]) -> None:
    """Make the module executing with ``namespace`` (imported by file name) the package member of its name."""
    install()
    name = namespace["__name__"]
    module = sys.modules[name]
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", namespace["__file__"])
    namespace["__package__"], namespace["__spec__"] = PACKAGE, spec
    sys.modules[spec.name] = module


def run_script(path: str) -> NoReturn:
    """Run the script at ``path`` (in the repository root) as ``moss_tts_nano.<name>`` with ``__name__ == "__main__"``."""
    install()
    runpy.run_module(f"{PACKAGE}.{Path(path).stem}", run_name="__main__", alter_sys=True)
    raise SystemExit(0)
