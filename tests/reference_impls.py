"""Independent PyTorch reference implementations used by the parity tests.

We compare against open_clip's own modules (ModifiedResNet, the text Transformer and CLIP's reference
SimpleTokenizer). open_clip's package ``__init__`` imports torchvision, whose PyPI wheel does not load beside
the CPU torch wheel we pin, so we load the individual torch-only source files of the installed open_clip as
members of a private package, with a stand-in for the one torchvision symbol (``FrozenBatchNorm2d``) that
open_clip's ``utils`` imports but our tests never use. `random_clip` builds such a CLIP with random weights, the
source of the CLIP state dicts the weight-import tests convert.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import numpy as np

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


def randomize_(module, seed: int):
  """Non-trivial BatchNorm running statistics and affine parameters, LayerNorm and bias values (zeros and ones
  by default, which would hide a mix-up of scale/bias/mean/var or q/k/v biases)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=g)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
      elif name.endswith("running_mean") or name.endswith("bias"):
        tensor.copy_(0.2 * noise)
      elif tensor.ndim == 1:  # BatchNorm / LayerNorm weights.
        tensor.copy_(1 + 0.2 * noise)


def random_clip(
  vision_layers, vision_width: int, embed_dim: int, text_width: int, text_layers: int, vocab_size: int, seed: int
):
  """A CLIP ResNet with random weights, as open_clip builds it for a 224×224 image and 77 text positions.

  CLIP's heads are 64 wide: vision_width·32/64 heads in the attention pool, text_width/64 in the text
  transformer. Returns (visual, text) open_clip modules in eval mode and their OpenAI-named state dict (NumPy,
  plus the logit_scale that FCNet ignores).
  """
  import torch

  torch.manual_seed(seed)
  modified_resnet = open_clip_module("modified_resnet")
  transformer = open_clip_module("transformer")
  visual = modified_resnet.ModifiedResNet(
    list(vision_layers), output_dim=embed_dim, heads=vision_width * 32 // 64, image_size=224, width=vision_width
  )
  text = transformer.TextTransformer(
    context_length=77,
    vocab_size=vocab_size,
    width=text_width,
    heads=text_width // 64,
    layers=text_layers,
    output_dim=embed_dim,
    act_layer=transformer.QuickGELU,
    output_tokens=True,
  )
  randomize_(visual, 1)
  randomize_(text, 2)
  visual.eval()
  text.eval()
  state_dict = {f"visual.{k}": v.numpy().copy() for k, v in visual.state_dict().items()}
  state_dict.update({k: v.numpy().copy() for k, v in text.state_dict().items()})
  state_dict["logit_scale"] = np.float32(4.6)
  return visual, text, state_dict
