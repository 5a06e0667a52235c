"""The resolved configuration of a run, saved beside its checkpoints so that a checkpoint rebuilds its model.

Training writes `<workdir>/config.json` before its first step; an exported model (`fcnet_jax.tools.export
--format=orbax`) carries the same file. It holds the whole resolved `ml_collections` config (every command-line
override applied) and the tokenizer settings the model was trained with:

    {"format": 1,
     "config": {...},                                   # config.to_dict(); tuples stored as JSON lists
     "tokenizer": {"name": "clip-bpe", "vocab_size": 49408, "context_length": 17,
                   "sot": 49406, "eot": 49407, "pad": 0}}

`load` turns the lists back into tuples, so the loaded config equals the one that was saved. Prediction, export,
the demo and `--mode=eval` read it; a workdir from before this file existed gets an error naming the flag to pass
instead (`--config=` the configuration it was trained with).
"""

from typing import Any, Dict, List, Mapping, Optional

from fcnet_jax import fileio
from fcnet_jax import tokenizer

CONFIG_FILE = "config.json"
FORMAT = 1
# Fields that must agree between a saved run and a configuration used to read its checkpoints: they decide the
# parameter tree, the preprocessing or the meaning of the outputs.
MATCHING_FIELDS = ("model", "data.letterbox")


def tokenizer_settings(config: Any) -> Dict[str, Any]:
  """What a user of the model must reproduce to tokenize sentences as in training."""
  return {
    "name": "clip-bpe",
    "vocab_size": int(config.model.vocab_size),
    "context_length": int(config.model.context_length),
    "sot": tokenizer.SOT_TOKEN,
    "eot": tokenizer.EOT_TOKEN,
    "pad": tokenizer.PAD_TOKEN,
  }


def to_json(config: Any) -> Dict[str, Any]:
  """The JSON document of `config` (an ml_collections.ConfigDict)."""
  return {"format": FORMAT, "config": config.to_dict(), "tokenizer": tokenizer_settings(config)}


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def from_json(document: Mapping[str, Any], source: str = "config.json") -> Any:
  """The ml_collections.ConfigDict of a `to_json` document; `source` names it in errors."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  if not isinstance(document, Mapping) or "config" not in document:
    raise ValueError(f"{source}: not a fcnet_jax run configuration (no 'config' field)")
  if document.get("format") != FORMAT:
    raise ValueError(f"{source}: format {document.get('format')!r}, this fcnet_jax reads format {FORMAT}")
  return ml_collections.ConfigDict(_with_defaults(_tuples(dict(document["config"]))))


# Fields whose configs/default.py value is not what a run saved before the field existed did.
BEFORE_FIELD_EXISTED = {"data.device_letterbox": False}  # Added off; on by default since record format 2 shards.


def _with_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
  """`saved` plus the current defaults (configs/default.py) of fields added since it was written.

  New fields default to the behaviour from before they existed (e.g. `model.backbone` = the CLIP ResNet), so an
  older run's config.json rebuilds the same model; where a field was added with that behaviour and its default
  changed later, `BEFORE_FIELD_EXISTED` holds the old value.
  """
  from configs import default  # pylint: disable=g-import-not-at-top

  defaults = default.get_config().to_dict()
  for dotted, value in BEFORE_FIELD_EXISTED.items():
    *parents, name = dotted.split(".")
    node = defaults
    for parent in parents:
      node = node[parent]
    node[name] = value

  def fill(values: Dict[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(values)
    for key, value in defaults.items():
      if key not in out:
        out[key] = value
      elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
        out[key] = fill(out[key], value)
    return out

  return fill(saved, defaults)


def path(directory: fileio.PathLike) -> fileio.epath.Path:
  return fileio.as_path(directory) / CONFIG_FILE


def exists(directory: fileio.PathLike) -> bool:
  return path(directory).exists()


def load(directory: fileio.PathLike) -> Any:
  """The configuration saved in `directory` (a training workdir or an exported model).

  Raises:
    FileNotFoundError: there is no config.json (a run from before configs were saved, or not a run at all);
      the message says to pass `--config=` the file the run was trained with.
  """
  file = path(directory)
  if not file.exists():
    raise FileNotFoundError(
      f"{file} does not exist: {directory} is not a training workdir or exported model of this version of "
      "fcnet_jax (runs started before configs were saved have none). Pass --config=<the config file it was "
      "trained with> (plus the same --config.* overrides) instead."
    )
  return from_json(fileio.read_json(file), str(file))


def save(config: Any, directory: fileio.PathLike) -> None:
  """Writes `config` as `directory`/config.json (atomically)."""
  fileio.write_json(path(directory), to_json(config))


def _get(config: Any, dotted: str) -> Any:
  value = config
  for key in dotted.split("."):
    value = value.get(key) if hasattr(value, "get") else None
  return value


def _flat(value: Any, prefix: str) -> Dict[str, Any]:
  if hasattr(value, "items"):
    out = {}
    for k, v in value.items():
      out.update(_flat(v, f"{prefix}.{k}"))
    return out
  return {prefix: value}


def differences(saved: Any, given: Any, fields=MATCHING_FIELDS) -> List[str]:
  """'field: saved → given' for every field under `fields` that differs between two configurations."""
  diffs = []
  for field in fields:
    a, b = _flat(_get(saved, field), field), _flat(_get(given, field), field)
    for key in sorted(set(a) | set(b)):
      if a.get(key, "<missing>") != b.get(key, "<missing>"):
        diffs.append(f"{key}: {a.get(key, '<missing>')!r} (saved) vs {b.get(key, '<missing>')!r} (given)")
  return diffs


def check_matches(saved: Any, given: Any, source: str, fields=MATCHING_FIELDS) -> None:
  """Raises ValueError listing the model/preprocessing fields in which `given` differs from the saved config."""
  diffs = differences(saved, given, fields)
  if diffs:
    raise ValueError(f"the configuration does not match the one {source} was trained with:\n  " + "\n  ".join(diffs))


def resolve(directory: fileio.PathLike, given: Optional[Any] = None, *, fields=MATCHING_FIELDS) -> Any:
  """The config to read `directory`'s checkpoints with: the saved one, checked against `given` when both exist.

  With no saved config, `given` is used as it is (old workdirs); with neither, `load`'s error explains. `fields`:
  what must agree (evaluation checks only "model": scoring a model under the other letterbox protocol is a
  deliberate experiment, logged as a warning).
  """
  if not exists(directory):
    if given is None:
      return load(directory)
    return given
  saved = load(directory)
  if given is not None:
    check_matches(saved, given, str(directory), fields)
    for diff in differences(saved, given, [f for f in MATCHING_FIELDS if f not in fields]):
      from absl import logging  # pylint: disable=g-import-not-at-top

      logging.warning("%s was trained with another setting: %s", directory, diff)
    return given
  return saved
