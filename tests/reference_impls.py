"""Independent PyTorch reference implementations used by the parity tests.

We compare against open_clip's own modules (ModifiedResNet, the text Transformer and CLIP's reference
SimpleTokenizer). open_clip's package ``__init__`` imports torchvision, whose PyPI wheel does not load beside
the CPU torch wheel we pin, so we load the individual torch-only source files of the installed open_clip as
members of a private package, with a stand-in for the one torchvision symbol (``FrozenBatchNorm2d``) that
open_clip's ``utils`` imports but our tests never use.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

_PKG = "_open_clip_ref"


def _open_clip_dir() -> str:
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("open_clip_torch is not installed; run `pip install --no-deps open_clip_torch==3.3.0`")
  return list(spec.submodule_search_locations)[0]


def _install_torchvision_stub():
  if "torchvision.ops.misc" in sys.modules:
    return
  try:  # A working torchvision is fine too.
    import torchvision.ops.misc  # noqa: F401
    return
  except Exception:  # Missing, or the broken wheel ("operator torchvision::nms does not exist").
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
  import torch

  class FrozenBatchNorm2d(torch.nn.Module):  # Never instantiated by the tests.
    pass

  def stub(name):
    module = types.ModuleType(name)
    # A spec lets `importlib.util.find_spec("torchvision")` (done by transformers) work on the stand-in.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module

  tv, ops, misc = stub("torchvision"), stub("torchvision.ops"), stub("torchvision.ops.misc")
  misc.FrozenBatchNorm2d = FrozenBatchNorm2d
  tv.ops, ops.misc = ops, misc
  sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})


def open_clip_module(name: str):
  """Returns open_clip's submodule `name` (e.g. "modified_resnet", "transformer", "tokenizer")."""
  if _PKG not in sys.modules:
    _install_torchvision_stub()
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [_open_clip_dir()]
    sys.modules[_PKG] = pkg
  return importlib.import_module(f"{_PKG}.{name}")


def open_clip_vocab_path() -> str:
  return os.path.join(_open_clip_dir(), "bpe_simple_vocab_16e6.txt.gz")
