"""Converts raw RefCOCO / RefCOCO+ / RefCOCOg (refer) annotations and COCO images into TFRecord shards.

  fcnet-convert --refer_root=DIR --coco_images=DIR --dataset=refcoco --split_by=unc --out=DIR \\
      [--splits=train,val] [--num_workers=N] [--skip_bad_images] [--shard_size=256]

(or `python -m input_pipeline.convert ...`). Inputs (docs/data.md, "Raw inputs"): `--refer_root` holds one folder
per dataset as the refer downloads unpack (`refcoco/refs(unc).p`, `refcoco/instances.json`,
`refcocog/refs(umd).p`, ...); `--coco_images` is the folder of COCO train2014 JPEGs or its parent (with a
`train2014/` subfolder).

SECURITY: the refs files are Python pickles, and loading a pickle can execute arbitrary code. Only convert refer
files you trust (e.g. downloaded yourself from the refer authors).

Output: one `tf.train.Example` per ref in the layout of `input_pipeline.records` (record format
`records.FORMAT_VERSION`), `<out>/summary.json` with format_version, dataset, split_by, context_length (77) and per
split the refs, sentences and shards (and refs skipped / re-encoded); the counts are checked against the records
read back from disk before it is written, and an existing summary is merged, so splits may be converted by
separate runs. Next to it, TFDS metadata (`input_pipeline.tfds_metadata`: dataset_info.json, features.json), so
that `tfds.builder_from_directory(<out>)` reads the shards as a TFDS dataset. summary.json is written last: it
marks a finished conversion.

Why TFRecord shards with TFDS metadata and not a TFDS builder class: there is no download to automate (users fetch
the data by hand), the converter resumes shard by shard, and the training pipeline reads the shards with its own
seeded, resumable tf.data code (docs/data.md, "TensorFlow Datasets").

What a record holds and why:
  * the image as its original file bytes: decoding happens in the stored pixel frame (EXIF orientation is
    ignored by tf.io.decode_image, and COCO's masks are drawn in that frame). Grayscale and CMYK JPEGs decode
    to 3-channel RGB in tf.io.decode_image(channels=3) (TF converts Adobe CMYK like PIL does), so they are kept
    as they are. A file TF cannot decode but PIL can (e.g. a TIFF named .jpg) is re-encoded losslessly as an RGB
    PNG (`image/reencoded` = 1). The decoded size must equal instances.json's height×width, else the image is bad.
  * the referred annotation's mask as a single-channel 0/1 PNG, decoded as COCO's API does (`annToRLE`): polygon
    lists through `frPyObjects` + `merge`, RLE with uncompressed list counts through `frPyObjects`, RLE with
    compressed string counts directly.
  * every sentence (`sent`, the normalized text) with its id and its 77 CLIP token ids (fcnet_jax.tokenizer).
A missing, truncated or undecodable image is an error naming the file (one line on the command line); with
--skip_bad_images its refs are skipped and counted instead.

Resumability (`input_pipeline.shards`): shards are a deterministic function of the refs file and `shard_size`
and each is written atomically, so a rerun keeps every finished shard and writes the rest. Shards are spread
over `num_workers` spawned processes, so a script that calls `convert(..., num_workers > 1)` must do so under
`if __name__ == "__main__":`.
"""

import json
import logging
import os
from typing import Dict, Optional, Sequence

from absl import flags

from fcnet_jax import cli
from fcnet_jax import fileio
from input_pipeline import records
from input_pipeline import refer
from input_pipeline import shards as shards_lib
from input_pipeline import tfds_metadata

DEFAULT_SHARD_SIZE = 256  # ~40 MB of COCO images per shard; RefCOCO train -> 166 shards.


def _existing_summary(path: str, header: Dict[str, object]) -> dict:
  if not fileio.as_path(path).exists():
    return {**header, "splits": {}}
  summary = fileio.read_json(path)
  if summary.get("format_version", 1) != records.FORMAT_VERSION:
    raise ValueError(
      f"{path} describes shards of record format {summary.get('format_version', 1)}; this converter writes format "
      f"{records.FORMAT_VERSION} (docs/data.md, 'The record format'): convert into a new --out folder (or delete "
      "this one), and point config.data.tfrecord_dir at it"
    )
  for key, value in header.items():
    if summary.get(key) != value:
      raise ValueError(
        f"{path} has {key}={summary.get(key)!r}, but this conversion writes {key}={value!r}; use another --out"
      )
  return summary


def convert(
  refer_root: str,
  coco_images: str,
  dataset: str,
  split_by: str,
  out_dir: str,
  *,
  splits: Optional[Sequence[str]] = None,
  num_workers: Optional[int] = None,
  skip_bad_images: bool = False,
  shard_size: int = DEFAULT_SHARD_SIZE,
) -> Dict[str, object]:
  """Converts the refs of `splits` to TFRecord shards under `out_dir` and writes/merges `summary.json`.

  Args:
    refer_root: folder with `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
      The refs file is a pickle: it can execute code when loaded, so only use files you trust.
    coco_images: the COCO train2014 JPEG folder, or its parent.
    dataset: refcoco | refcoco+ | refcocog.
    split_by: unc | google | umd (see `refer.SPLITS` for the valid combinations and their splits).
    out_dir: output root (records.py layout).
    splits: the splits to convert; default: every split of the combination present in the refs file.
    num_workers: processes writing shards (default: CPU count); <= 1 converts in this process.
    skip_bad_images: skip (and count) the refs of missing / corrupt / wrongly sized images instead of failing.
    shard_size: refs per shard; a rerun must use the same value to resume.

  Returns:
    The summary written to `<out_dir>/summary.json`: format_version, dataset, split_by, context_length and, per
    split, refs, sentences, shards, skipped_refs and reencoded_refs.
  """
  split_names = refer.known_splits(dataset, split_by)
  refer_dir = os.path.join(refer_root, dataset)
  refs_path = os.path.join(refer_dir, f"refs({split_by}).p")
  instances_path = os.path.join(refer_dir, "instances.json")
  for path in (refs_path, instances_path):
    if not fileio.as_path(path).is_file():
      raise FileNotFoundError(
        f"{path} not found (--refer_root={refer_root}, --dataset={dataset}, --split_by={split_by})"
      )
  if splits is not None:
    unknown = [s for s in splits if s not in split_names]
    if unknown:
      raise ValueError(f"unknown split(s) {unknown} for {dataset}/{split_by}; known: {list(split_names)}")
  header = {
    "format_version": records.FORMAT_VERSION,
    "dataset": dataset,
    "split_by": split_by,
    "context_length": records.STORED_CONTEXT_LENGTH,
  }
  summary_path = os.path.join(out_dir, records.SUMMARY_FILE)
  summary = _existing_summary(summary_path, header)  # Fail before any work if --out holds another dataset.

  refs = refer.load_refs(refs_path)
  present = {ref["split"] for ref in refs}
  if splits is None:
    splits = [s for s in split_names if s in present]
  if present - set(split_names):
    logging.warning(
      "%s has refs of split(s) %s, which %s/%s does not define; they are not converted",
      refs_path,
      sorted(present - set(split_names)),
      dataset,
      split_by,
    )
  empty = [s for s in splits if s not in present]
  if empty:
    raise ValueError(f"{refs_path} has no refs of split(s) {empty}; it has {sorted(present)}")
  anns, images = refer.load_instances(instances_path)
  first = next((r for r in refs if r["split"] in splits), None)
  sample = images.get(first["image_id"], {}).get("file_name") if first else None
  image_dir = refer.resolve_image_dir(coco_images, sample)
  if num_workers is None:
    num_workers = os.cpu_count() or 1

  work = []
  for split in splits:
    items = refer.ref_items([r for r in refs if r["split"] == split], anns, images, image_dir, refs_path)
    planned = shards_lib.plan_shards(items, shard_size)
    split_dir = os.path.join(out_dir, split)
    names = [records.shard_name(split, i, len(planned)) for i in range(len(planned))]
    shards_lib.prepare_split_dir(split_dir, names, shard_size)
    work.append(
      (
        split,
        [
          shards_lib.ShardTask(os.path.join(split_dir, name), shard, skip_bad_images)
          for name, shard in zip(names, planned)
        ],
      )
    )

  results = {}
  all_tasks = [task for _, tasks in work for task in tasks]
  for result in shards_lib.write_shards(all_tasks, num_workers, f"{dataset}({split_by}) {','.join(splits)}"):
    results[result.path] = result
    for ref_id, reason in result.skipped:
      logging.warning("skipped ref_id=%d: %s", ref_id, reason)
  for split, tasks in work:
    written = sum(results[task.path].written for task in tasks)
    logging.info("%s: wrote %d shards, kept %d finished ones", split, written, len(tasks) - written)
    summary["splits"][split] = shards_lib.check_split(tasks, results, skip_bad_images)
  tfds_metadata.write(out_dir, summary)
  fileio.write_json(summary_path, summary)  # Last: a summary means the conversion finished.
  return summary


def define_flags() -> None:
  """The command-line flags of `main` (defined by `run`, so that importing this module defines none)."""
  flags.DEFINE_string(
    "refer_root",
    None,
    "Folder with <dataset>/refs(<split_by>).p and <dataset>/instances.json. "
    "SECURITY: refs(...).p files are pickles, which can execute arbitrary code when loaded: only "
    "convert files you trust.",
  )
  flags.DEFINE_string("coco_images", None, "COCO train2014 JPEG folder, or its parent.")
  flags.DEFINE_string("dataset", None, "refcoco | refcoco+ | refcocog.")
  flags.DEFINE_string("split_by", None, "unc | google | umd.")
  flags.DEFINE_string("out", None, "Output folder (TFRecord shards per split, and summary.json).")
  flags.DEFINE_list("splits", None, "Comma-separated splits (default: all in the refs file).")
  flags.DEFINE_integer("num_workers", None, "Processes writing shards (default: CPU count).")
  flags.DEFINE_bool("skip_bad_images", False, "Skip and count refs whose image is missing, corrupt or wrongly sized.")
  flags.DEFINE_integer("shard_size", DEFAULT_SHARD_SIZE, "Refs per shard; a rerun must use the same value.")
  flags.mark_flags_as_required(["refer_root", "coco_images", "dataset", "split_by", "out"])


def main(argv: Sequence[str]) -> None:
  del argv  # Checked by cli.run.
  args = flags.FLAGS
  summary = convert(
    args.refer_root,
    args.coco_images,
    args.dataset,
    args.split_by,
    args.out,
    splits=args.splits,
    num_workers=args.num_workers,
    skip_bad_images=args.skip_bad_images,
    shard_size=args.shard_size,
  )
  print(json.dumps(summary, indent=2, sort_keys=True))


def run() -> None:
  """The `fcnet-convert` entry point."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
