"""Exported FCNet models: one inference function, written in four formats (docs/export.md).

Every format computes the same function (`inference_function`):

    logits = f(image, tokens)
      image   float32 B×S×S×3, RGB values 0…255, letterboxed as training did (`preprocess`)
      tokens  int32 B×L CLIP BPE ids: [SOT] sentence [EOT], then 0s (`fcnet_jax.tokenizer.tokenize`)
      logits  float32 B×S/4×S/4, before the sigmoid; mask = sigmoid(logits) > config.mask_threshold

The CLIP normalisation happens inside, so a user ships the letterboxed pixels as they are. The formats:

  orbax       `pretrained.save`: parameters and BatchNorm statistics (fp32 or bf16), config.json, a model card;
              read by `Predictor.from_checkpoint`, `main.py --mode=eval --checkpoint=` and `config.init_from`.
  stablehlo   `jax.export` serialized (weights inside), symbolic batch; runs with jax alone.
  savedmodel  TensorFlow SavedModel through `jax2tf` (weights as variables), symbolic batch: TF Serving, TFLite.
  onnx        `jax2onnx`, symbolic batch; runs in onnxruntime.

Each non-orbax directory also holds signature.json (the inputs, outputs and preprocessing above, for this model),
config.json (`run_config`) and a README.md saying how to load and call it. Every directory is written atomically.
"""

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax import data as data_lib
from fcnet_jax import fileio
from fcnet_jax import letterbox
from fcnet_jax import pretrained
from fcnet_jax import run_config
from fcnet_jax.models import fcnet

FORMATS = ("orbax", "stablehlo", "savedmodel", "onnx")
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
SAVEDMODEL_DIR = "saved_model"
SIGNATURE_FILE = "signature.json"
# The platforms a StableHLO/SavedModel export runs on: lowering for CUDA needs no GPU here.
PLATFORMS = ("cpu", "cuda")
ONNX_OPSET = 21
BATCH_DIM = "batch"
ONNX_INSTALL = "pip install --no-deps jax2onnx==0.17.1 && pip install onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.31.1"
InferenceFn = Callable[[Any, Any], Any]


# ----------------------------------------------------------------------------------------------------- function


def variables_of(loaded: pretrained.Loaded) -> Dict[str, Any]:
  """{"params", "batch_stats"} of a loaded model as NumPy arrays (host copies; what every format embeds)."""
  state = loaded.state
  return jax.tree.map(np.asarray, {"params": flax.core.unfreeze(state.params), "batch_stats": state.batch_stats})


def apply_function(model: fcnet.FCNet) -> Callable[[Any, Any, Any], jax.Array]:
  """(variables, image, tokens) → logits: the exported computation with the variables as an argument."""

  def apply(variables: Any, image: jax.Array, tokens: jax.Array) -> jax.Array:
    images, tokens = data_lib.model_inputs({"image": image, "tokens": tokens}, fcnet.DTYPES[model.dtype])
    return model.apply(variables, images, tokens, train=False).astype(jnp.float32)

  return apply


def inference_function(model: fcnet.FCNet, variables: Any) -> InferenceFn:
  """(image, tokens) → logits with `variables` fixed: what the stablehlo and onnx files hold (module docstring)."""
  return functools.partial(apply_function(model), variables)


@dataclasses.dataclass
class Preprocessed:
  """The inputs of an exported model for one image and N sentences, and the letterbox geometry to undo it."""

  image: np.ndarray  # float32 N×S×S×3, 0…255: the letterboxed image once per sentence.
  tokens: np.ndarray  # int32 N×L.
  original_hw: Tuple[int, int]  # (h, w) of the image.
  resized_hw: Tuple[int, int]  # (nh, nw): the image's size on the canvas.
  top_left: Tuple[int, int]  # where it sits on the canvas.


def preprocess(image: Any, sentences: Union[str, Sequence[str]], config: Any) -> Preprocessed:
  """The exported model's inputs for `image` and `sentences`, exactly as training and `Predictor` make them.

  Args:
    image: a uint8 H×W×3 RGB array, or anything `fcnet_jax.predict.load_image` reads (a path, a PIL image).
    sentences: one sentence or several (each paired with the same image).
    config: the model's configuration (`run_config.load(<export dir>)`): image size, letterbox, context length.
  """
  from fcnet_jax import predict  # pylint: disable=g-import-not-at-top  (PIL decoding, EXIF, size limits)

  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3):
    image = predict.load_image(image)
  # The Predictor's checks and truncation warnings: an empty sentence is an error here too.
  sentences, tokens, _ = predict.tokenize_sentences(sentences, config.model.context_length)
  canvas, resized_hw, top_left = letterbox.letterbox_image(image, config.model.image_size, config.data.letterbox)
  images = np.repeat(canvas[None].astype(np.float32), len(sentences), axis=0)
  return Preprocessed(images, tokens, tuple(image.shape[:2]), tuple(resized_hw), tuple(top_left))


def input_specs(config: Any, batch: Optional[int] = None) -> Tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """The abstract (image, tokens) of an export: batch `batch`, or symbolic (`BATCH_DIM`) when None."""
  (b,) = jax.export.symbolic_shape(BATCH_DIM) if batch is None else (int(batch),)
  size, length = config.model.image_size, config.model.context_length
  return jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((b, length), jnp.int32)


def signature(config: Any, fmt: str, batch: Optional[int] = None) -> Dict[str, Any]:
  """What signature.json says: the inputs and outputs of the exported function and how to make the inputs."""
  s, length, b = config.model.image_size, config.model.context_length, BATCH_DIM if batch is None else int(batch)
  return {
    "format": fmt,
    "inputs": [
      {"name": "image", "shape": [b, s, s, 3], "dtype": "float32", "values": "RGB 0..255, letterboxed"},
      {"name": "tokens", "shape": [b, length], "dtype": "int32", "values": "CLIP BPE ids, [SOT] ... [EOT] then 0"},
    ],
    "outputs": [{"name": "logits", "shape": [b, s // 4, s // 4], "dtype": "float32", "values": "before sigmoid"}],
    "letterbox": config.data.letterbox,
    "letterbox_padding_rgb": list(letterbox.MEAN_RGB_UINT8),
    "mask_threshold": float(config.mask_threshold),
    "tokenizer": run_config.tokenizer_settings(config),
  }


# ----------------------------------------------------------------------------------------------------- writing


def _write_common(directory: fileio.epath.Path, config: Any, fmt: str, batch: Optional[int], source: str) -> None:
  run_config.save(config, directory)
  info = signature(config, fmt, batch)
  fileio.write_json(directory / SIGNATURE_FILE, {**info, "source": source})
  fileio.atomic_write(directory / "README.md", _card(config, fmt, source))


def _card(config: Any, fmt: str, source: str) -> str:
  how = {
    "stablehlo": f"exported = jax.export.deserialize(open('{STABLEHLO_FILE}', 'rb').read())\n"
    "logits = exported.call(image, tokens)",
    "savedmodel": f"model = tf.saved_model.load('{SAVEDMODEL_DIR}')\n"
    "logits = model.signatures['serving_default'](image=image, tokens=tokens)['logits']",
    "onnx": f"session = onnxruntime.InferenceSession('{ONNX_FILE}')\n"
    "logits = session.run(['logits'], {'image': image, 'tokens': tokens})[0]",
  }[fmt]
  return "\n".join(
    [
      f"# FCNet (fcnet_jax), {fmt} export",
      "",
      f"Exported from `{source}`. Image size {config.model.image_size}, context length {config.model.context_length},"
      f" {config.data.letterbox} letterbox, mask threshold {config.mask_threshold}.",
      "",
      "```python",
      how,
      "```",
      "",
      "image: float32 B×S×S×3 RGB 0..255 letterboxed; tokens: int32 B×L CLIP ids; logits: float32 B×S/4×S/4",
      f"(before the sigmoid). {SIGNATURE_FILE} has the exact shapes; `fcnet_jax.export.preprocess` makes the inputs;",
      "see docs/export.md of fcnet_jax.",
      "",
    ]
  )


def save_stablehlo(
  directory: fileio.epath.Path, model: fcnet.FCNet, variables: Any, config: Any, batch: Optional[int] = None
) -> None:
  """Writes `jax.export`'s serialization of the inference function (weights inside) as STABLEHLO_FILE."""
  exported = jax.export.export(jax.jit(inference_function(model, variables)), platforms=PLATFORMS)(
    *input_specs(config, batch)
  )
  fileio.atomic_write(directory / STABLEHLO_FILE, bytes(exported.serialize()))


def load_stablehlo(path: fileio.PathLike) -> InferenceFn:
  """(image, tokens) → logits (NumPy) of a stablehlo export."""
  exported = jax.export.deserialize(bytearray((fileio.as_path(path) / STABLEHLO_FILE).read_bytes()))
  return lambda image, tokens: np.asarray(exported.call(image, tokens))


def save_savedmodel(
  directory: fileio.epath.Path, model: fcnet.FCNet, variables: Any, config: Any, batch: Optional[int] = None
) -> None:
  """Writes a TensorFlow SavedModel (jax2tf, weights as tf.Variables) with a "serving_default" signature."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  image_spec, token_spec = input_specs(config, batch)
  shape = lambda spec: (
    "(" + ", ".join("b" if batch is None and i == 0 else str(d) for i, d in enumerate(spec.shape)) + ")"
  )
  converted = jax2tf.convert(
    apply_function(model),
    polymorphic_shapes=[None, shape(image_spec), shape(token_spec)],
    with_gradient=False,
    native_serialization_platforms=PLATFORMS,
  )
  module = tf.Module()
  module.weights = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), variables)

  def tensor_spec(spec, dtype, name):
    return tf.TensorSpec([None if batch is None else batch, *spec.shape[1:]], dtype, name=name)

  @tf.function(
    autograph=False,
    input_signature=[tensor_spec(image_spec, tf.float32, "image"), tensor_spec(token_spec, tf.int32, "tokens")],
  )
  def serve(image, tokens):
    return {"logits": converted(module.weights, image, tokens)}

  module.serve = serve
  tf.saved_model.save(module, str(directory / SAVEDMODEL_DIR), signatures={"serving_default": serve})


def load_savedmodel(path: fileio.PathLike) -> InferenceFn:
  """(image, tokens) → logits (NumPy) of a savedmodel export, through TensorFlow."""
  from input_pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top

  tf = import_tensorflow()
  serve = tf.saved_model.load(str(fileio.as_path(path) / SAVEDMODEL_DIR)).signatures["serving_default"]
  return lambda image, tokens: serve(image=tf.constant(image), tokens=tf.constant(tokens))["logits"].numpy()


def save_onnx(
  directory: fileio.epath.Path, model: fcnet.FCNet, variables: Any, config: Any, batch: Optional[int] = None
) -> None:
  """Writes the inference function as ONNX (jax2onnx; inputs "image", "tokens", output "logits").

  jax2onnx converts a function by tracing it with its own replacements of flax/jax.numpy functions, some of which
  do not take our calls (a positional `window_shape` in `nn.avg_pool`; `jax.image.resize` and `jnp.arange` with a
  symbolic batch). So the function is traced to a jaxpr by JAX first, with the same symbolic batch dimension, and
  jax2onnx converts the replay of that jaxpr: only JAX primitives reach it. onnxruntime has no CPU kernel for
  `Where` on booleans (the text encoder's causal mask), so those go through uint8 (`_bool_where_as_uint8`), nor
  for bfloat16 convolutions, so a bfloat16-compute model is exported computing in float32.
  """
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"--format=onnx needs jax2onnx, onnx and onnxruntime: {ONNX_INSTALL} (docs/export.md)") from e
  for name in ("jax2onnx", "onnx_ir"):  # Plugins for libraries we do not use (equinox, dm-pix) fail to import.
    logging.getLogger(name).setLevel(logging.ERROR)
  if model.dtype != "float32":  # onnxruntime has no bfloat16/float16 Conv on the CPU: compute in float32.
    logging.warning("--format=onnx computes in float32 (the model's compute dtype is %s)", model.dtype)
    model = model.clone(dtype="float32")
  specs = list(input_specs(config, batch))
  closed = jax.make_jaxpr(inference_function(model, variables))(*specs)

  def replay(image, tokens):
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, image, tokens)[0]

  proto = jax2onnx.to_onnx(
    replay, specs, model_name="fcnet", opset=ONNX_OPSET, input_names=["image", "tokens"], output_names=["logits"]
  )
  fileio.atomic_write(directory / ONNX_FILE, _bool_where_as_uint8(proto).SerializeToString())


def _bool_where_as_uint8(proto: Any) -> Any:
  """`proto` with every boolean Where(c, x, y) computed as Cast(Where(c, uint8 x, uint8 y), bool)."""
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto  # pylint: disable=g-import-not-at-top

  graph = proto.graph
  types = {t.name: t.data_type for t in graph.initializer}
  types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]})
  nodes = []
  for node in graph.node:
    if node.op_type != "Where" or TensorProto.BOOL not in (types.get(node.input[1]), types.get(node.output[0])):
      nodes.append(node)
      continue
    x, y, out = (f"{node.name}_{part}_uint8" for part in ("x", "y", "out"))
    nodes += [
      helper.make_node("Cast", [node.input[1]], [x], to=TensorProto.UINT8),
      helper.make_node("Cast", [node.input[2]], [y], to=TensorProto.UINT8),
      helper.make_node("Where", [node.input[0], x, y], [out], name=node.name),
      helper.make_node("Cast", [out], [node.output[0]], to=TensorProto.BOOL),
    ]
  del graph.node[:]
  graph.node.extend(nodes)
  return proto


def load_onnx(path: fileio.PathLike) -> InferenceFn:
  """(image, tokens) → logits (NumPy) of an onnx export, through onnxruntime on the CPU."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  session = onnxruntime.InferenceSession(str(fileio.as_path(path) / ONNX_FILE), providers=["CPUExecutionProvider"])
  return lambda image, tokens: session.run(["logits"], {"image": image, "tokens": tokens})[0]


def load_orbax(path: fileio.PathLike) -> InferenceFn:
  """(image, tokens) → logits (NumPy) of an orbax export (or a workdir's best checkpoint), jitted with jax."""
  loaded = pretrained.load(path)
  function = jax.jit(
    inference_function(loaded.model, {"params": loaded.state.params, "batch_stats": loaded.state.batch_stats})
  )
  return lambda image, tokens: np.asarray(function(image, tokens))


SAVERS = {"stablehlo": save_stablehlo, "savedmodel": save_savedmodel, "onnx": save_onnx}
LOADERS = {"orbax": load_orbax, "stablehlo": load_stablehlo, "savedmodel": load_savedmodel, "onnx": load_onnx}


def read_metrics(workdir: fileio.PathLike, step: int) -> Dict[str, Dict[str, float]]:
  """{split: scores} of the eval_<split>.json files in `workdir` that scored `step` (others are of other steps)."""
  metrics = {}
  for file in sorted(fileio.as_path(workdir).glob("eval_*.json")):
    scores = fileio.read_json(file)
    if scores.get("step") == step:
      metrics[file.stem[len("eval_") :]] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
  return metrics


def export(
  checkpoint: fileio.PathLike,
  fmt: str,
  out: fileio.PathLike,
  *,
  step: Union[str, int] = "best",
  dtype: str = "float32",
  batch: Optional[int] = None,
  replace: bool = False,
  loaded: Optional[pretrained.Loaded] = None,
) -> fileio.epath.Path:
  """Exports the model of `checkpoint` (a training workdir or an orbax export) as `fmt` into `out`; returns it.

  Args:
    checkpoint: the directory to read (`pretrained.load`).
    fmt: one of FORMATS.
    out: the directory to create (atomically).
    step: "best", "latest" or a step number of a workdir.
    dtype: orbax only: "float32" or "bfloat16" storage.
    batch: a fixed batch size; None exports a symbolic batch dimension (not for orbax).
    replace: replace an existing `out`.
    loaded: the already loaded model of `checkpoint` (saves reading it again).
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
  if dtype != "float32" and fmt != "orbax":
    raise ValueError(f"--dtype={dtype!r} is for --format=orbax; {fmt} exports the model's own compute dtype")
  out = pretrained._absolute(out)  # pylint: disable=protected-access
  if out.exists() and not replace:  # Before the (long) conversion; atomic_output checks again at the end.
    raise FileExistsError(f"--out={out} already exists; remove it, choose another or pass --overwrite")
  loaded = loaded or pretrained.load(checkpoint, step)
  variables = variables_of(loaded)
  if fmt == "orbax":
    exported = pretrained.is_exported(checkpoint)
    metrics = (
      pretrained.model_info(checkpoint).get("metrics", {}) if exported else read_metrics(checkpoint, loaded.step)
    )
    pretrained.save(
      out,
      loaded.config,
      variables,
      step=loaded.step,
      source=loaded.source,
      metrics=metrics,
      dtype=dtype,
      replace=replace,
    )
    return out
  with fileio.atomic_output(out, directory=True, replace=replace) as tmp:
    SAVERS[fmt](tmp, loaded.model, variables, loaded.config, batch)
    _write_common(tmp, loaded.config, fmt, batch, loaded.source)
  return out


def format_of(path: fileio.PathLike) -> str:
  """The format of an export directory (signature.json; an orbax export has model.json instead)."""
  path = fileio.as_path(path)
  if pretrained.is_exported(path):
    return "orbax"
  if not (path / SIGNATURE_FILE).exists():
    raise FileNotFoundError(f"{path} is not an export of fcnet_jax.tools.export (no {SIGNATURE_FILE})")
  return fileio.read_json(path / SIGNATURE_FILE)["format"]


def load(path: fileio.PathLike) -> InferenceFn:
  """(image, tokens) → logits (NumPy) of an export, run in its format's own runtime."""
  return LOADERS[format_of(path)](path)


def directory_size(path: fileio.PathLike) -> int:
  """Bytes of every file under `path` (local or gs://)."""
  path = fileio.as_path(path)
  return sum(directory_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def measure(path: fileio.PathLike, repeats: int = 5) -> Dict[str, float]:
  """Size on disk (MiB), load time, first call (compilation) and median batch-1 latency (s) of an export.

  The inputs are a blank letterboxed image and the empty sentence; the latency is the median of `repeats` calls.
  """
  path = fileio.as_path(path)
  config = run_config.load(path)
  image, tokens = data_lib.init_inputs(config.model.image_size, config.model.context_length)
  image, tokens = np.full(image.shape, 128.0, np.float32), np.asarray(tokens)
  size = directory_size(path)
  start = time.perf_counter()
  function = load(path)
  loaded = time.perf_counter()
  function(image, tokens)
  first = time.perf_counter()
  latencies = []
  for _ in range(repeats):
    begin = time.perf_counter()
    function(image, tokens)
    latencies.append(time.perf_counter() - begin)
  return {
    "size_mib": size / 2**20,
    "load_s": loaded - start,
    "first_call_s": first - loaded,
    "latency_s": float(np.median(latencies)),
  }
