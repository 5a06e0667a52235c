"""Reading CLIP checkpoint files into a name → array mapping, whatever format they were released in.

PyTorch is optional: it is imported only to read `.pt/.pth/.bin` files or when torch tensors are passed to
`to_numpy`; safetensors files are read with NumPy.
"""

import os
from typing import Any, Mapping, Tuple
import warnings
import zipfile

import numpy as np

# The two files of a Hugging Face open_clip snapshot, in order of preference (the first needs no PyTorch).
SNAPSHOT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "reading PyTorch checkpoints (.pt/.pth/.bin, OpenAI's TorchScript RN50.pt/RN101.pt) needs "
      "PyTorch: `pip install torch` (the CPU wheel is enough), or convert the open_clip "
      "safetensors file (open_clip_model.safetensors from the Hugging Face repos "
      "timm/resnet50_clip.openai, timm/resnet101_clip.openai), which needs no torch"
    ) from e
  return torch


def _is_safetensors(path: str) -> bool:
  """safetensors: 8-byte little-endian header length, then a JSON header that starts with '{'."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  header_len = int.from_bytes(head[:8], "little")
  return head[8:9] == b"{" and 0 < header_len < os.path.getsize(path)


def _unwrap_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  """The tensor mapping inside a torch.load result (training checkpoints nest it; DDP prefixes 'module.')."""
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
    raise ValueError(f"{path}: expected a state dict (a mapping from names to tensors), got {type(obj).__name__}")
  if all(k.startswith("module.") for k in obj):
    obj = {k[len("module.") :]: v for k, v in obj.items()}
  return obj


def _torch_load(path: str) -> Mapping[str, Any]:
  return _unwrap_state_dict(_torch().load(path, map_location="cpu", weights_only=True), path)


def read_state_dict(path: str) -> Tuple[Mapping[str, Any], str]:
  """Reads a CLIP checkpoint into a name → array mapping. Returns (state_dict, format description).

  Formats, detected from the content (the extension only has to agree):
    - OpenAI's released RN50.pt / RN101.pt: TorchScript zip archives (`torch.jit.load(...).state_dict()`).
    - `torch.save`d state dicts (.pt/.pth/.bin, zip or legacy pickle), e.g. open_clip_pytorch_model.bin;
      a {"state_dict": ...} training checkpoint and DDP's "module." prefix are unwrapped.
    - safetensors, e.g. open_clip_model.safetensors (read with NumPy, no torch needed).
  A directory is searched for open_clip_model.safetensors, then open_clip_pytorch_model.bin.
  """
  if os.path.isdir(path):
    for name in SNAPSHOT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        state_dict, source_format = read_state_dict(os.path.join(path, name))
        return state_dict, f"{source_format}: {name}"
    raise FileNotFoundError(
      f"{path} is a directory without {' or '.join(SNAPSHOT_FILES)}; pass the checkpoint file itself"
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
  if _is_safetensors(path):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

    return safetensors_numpy.load_file(path), "safetensors"
  if os.path.splitext(path)[1].lower() == ".safetensors":
    raise ValueError(f"{path} has a .safetensors extension but no safetensors header (truncated download?)")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
      torch = _torch()
      with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; OpenAI's releases are TorchScript.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(path, map_location="cpu")
      return dict(module.state_dict()), "TorchScript archive"
    return _torch_load(path), "torch.save zip"
  if magic[:1] == b"\x80":  # Pickle protocol ≥ 2: torch.save's legacy format.
    return _torch_load(path), "torch.save pickle"
  raise ValueError(
    f"{path}: not a TorchScript archive, torch.save file or safetensors file (starts with "
    f"{magic!r}); expected OpenAI's RN50.pt/RN101.pt or open_clip_model.safetensors"
  )


def to_numpy(value: Any) -> np.ndarray:
  """A float32 NumPy copy of an array or torch tensor (OpenAI's files hold float16 weights)."""
  if hasattr(value, "detach") and type(value).__module__.startswith("torch"):
    value = value.detach().cpu().float().numpy()  # .float() first: bfloat16 has no NumPy equivalent.
  return np.asarray(value, dtype=np.float32)
