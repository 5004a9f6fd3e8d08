"""Entry point: ``python bench/train_step ...`` (this folder run as a script)."""
import importlib.util
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
# Load this folder as the package ``train_step`` without putting it or bench/ on sys.path: its
# modules must not become top-level names, and bench/kernels.py would shadow the Hugging Face
# ``kernels`` package that transformers and bitsandbytes import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
_spec = importlib.util.spec_from_file_location("train_step", _here / "__init__.py",
                                               submodule_search_locations=[str(_here)])
_pkg = importlib.util.module_from_spec(_spec)
sys.modules["train_step"] = _pkg
_spec.loader.exec_module(_pkg)

from train_step.cli import main  # noqa: E402

sys.exit(main())
