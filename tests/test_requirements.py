"""The accelerator requirement files stay in step with requirements.txt (docs/cluster.md, "Installing").

`pip install -r requirements-gpu.txt` / `requirements-tpu.txt` must be the whole install step on a GPU machine or a
TPU VM: each includes requirements.txt and adds JAX's accelerator extra at exactly the jax version pinned there
(the CUDA plugin and libtpu are released per jax version; another version would upgrade jax past what flax, optax
and orbax were checked with). That the sets resolve is checked with `pip install --dry-run -r FILE` (≈2 minutes of
index reads, so not in this suite; see the files' headers).
"""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name: str):
  with open(os.path.join(REPO, name)) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  return [line for line in lines if line]


def _pins(lines):
  pins = {}
  for line in lines:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z0-9_,]+\])?==([^\s;]+)", line)
    if match:
      pins[match.group(1).lower()] = (match.group(2), match.group(3))
  return pins


def test_accelerator_files_add_the_extra_at_the_pinned_jax_version():
  base = _pins(_requirements("requirements.txt"))
  jax_version = base["jax"][1]
  assert base["jaxlib"] == (None, jax_version)
  for name, extra in (("requirements-gpu.txt", "[cuda12]"), ("requirements-tpu.txt", "[tpu]")):
    lines = _requirements(name)
    assert lines[0] == "-r requirements.txt", name
    assert _pins(lines[1:]) == {"jax": (extra, jax_version)}, name  # Nothing else re-pinned.
