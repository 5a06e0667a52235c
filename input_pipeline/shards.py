"""Writing the TFRecord shards of a split: the plan, the (parallel) writers, and the check of what was written.

Refs of a split are sorted by (image_id, ref_id) and cut into contiguous shards of `shard_size` (`plan_shards`),
a deterministic function of the refs file and `shard_size`. Each shard is written through
`fcnet_jax.fileio.atomic_output` (a temporary name, renamed when complete), so a rerun skips every shard whose
final file exists (after reading it back) and rewrites the rest. `write_shards` spreads shards over processes,
spawned (not forked: TensorFlow's thread pools do not survive a fork).
"""

import concurrent.futures
import dataclasses
import multiprocessing
import re
import sys
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import tqdm

from fcnet_jax import fileio
from fcnet_jax import tokenizer
from input_pipeline import import_tensorflow
from input_pipeline import records
from input_pipeline import refer

# The temporary names of `fileio.atomic_output` (".<name>.tmp-<8 hex>"): what a killed writer leaves behind.
_TEMPORARY_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{8}")


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard to write: its final path and its refs in order."""

  path: str
  items: Tuple[refer.RefItem, ...]
  skip_bad_images: bool


@dataclasses.dataclass(frozen=True)
class ShardResult:
  """What a shard holds, as read back from disk after writing (or instead of rewriting it)."""

  path: str
  written: bool  # False: the shard existed and was only read back.
  ref_ids: Tuple[int, ...]  # Read back from the file, in order.
  sentences: int  # Read back from the file.
  reencoded: int  # Records whose image was re-encoded (read back).
  skipped: Tuple[Tuple[int, str], ...]  # (ref_id, reason) of refs skipped in this run.


def plan_shards(items: Sequence[refer.RefItem], shard_size: int) -> List[Tuple[refer.RefItem, ...]]:
  """Contiguous shards of refs sorted by (image_id, ref_id): the same refs and shard_size give the same shards."""
  if shard_size < 1:
    raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
  ordered = sorted(items, key=lambda item: (item.image_id, item.ref_id))
  num_shards = max(1, -(-len(ordered) // shard_size))
  return [tuple(ordered[i * shard_size : (i + 1) * shard_size]) for i in range(num_shards)]


def prepare_split_dir(split_dir: str, shard_names: Sequence[str], shard_size: int) -> None:
  """Creates the split folder, drops an interrupted run's temporary files, and refuses shards of another layout."""
  directory = fileio.as_path(split_dir)
  directory.mkdir(parents=True, exist_ok=True)
  stray = []
  for name in sorted(path.name for path in directory.iterdir()):
    if _TEMPORARY_NAME.fullmatch(name):
      (directory / name).unlink()
    elif name.endswith(".tfrecord") and name not in shard_names:
      stray.append(name)
  if stray:
    raise ValueError(
      f"{split_dir} holds shards that are not in this conversion's layout ({len(shard_names)} "
      f"shards of --shard_size={shard_size}): {stray[:3]}{' ...' if len(stray) > 3 else ''}; "
      "delete them or rerun with the --shard_size that wrote them"
    )


def read_back(path: str) -> Tuple[Tuple[int, ...], int, int]:
  """(ref_ids in order, total sentences, re-encoded records) of a shard, read from disk."""
  tf = import_tensorflow()
  spec = records.feature_spec(["ref_id", "sentences/sent_id", records.REENCODED_FEATURE])

  def parse(serialized):
    example = tf.io.parse_single_example(serialized, spec)
    return (example["ref_id"], tf.size(example["sentences/sent_id"].values), example[records.REENCODED_FEATURE])

  ref_ids, sentences, reencoded = [], 0, 0
  try:
    for ids, counts, flags in tf.data.TFRecordDataset(path).map(parse).batch(1024).as_numpy_iterator():
      ref_ids.extend(int(i) for i in ids)
      sentences += int(counts.sum())
      reencoded += int(flags.sum())
  except tf.errors.OpError as e:
    raise RuntimeError(
      f"shard {path} cannot be read back ({type(e).__name__}: {e.message}); delete it and rerun the converter"
    ) from None
  return tuple(ref_ids), sentences, reencoded


def write_shard(task: ShardTask) -> ShardResult:
  """Writes one shard atomically (or only reads it back if it exists) and returns what is in it."""
  tf = import_tensorflow()
  if fileio.as_path(task.path).exists():
    return ShardResult(task.path, False, *read_back(task.path), skipped=())
  sentences = [s for item in task.items for s in item.sents]
  tokens = np.asarray(tokenizer.tokenize(sentences, records.STORED_CONTEXT_LENGTH))
  if tokens.shape != (len(sentences), records.STORED_CONTEXT_LENGTH):
    raise ValueError(
      f"fcnet_jax.tokenizer.tokenize returned shape {tokens.shape}, expected "
      f"({len(sentences)}, {records.STORED_CONTEXT_LENGTH})"
    )
  skipped = []
  cached_path, cached_image = None, None  # Refs of one image are adjacent (sorted by image_id).
  row = 0
  with fileio.atomic_output(task.path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
    for item in task.items:
      item_tokens, row = tokens[row : row + len(item.sents)], row + len(item.sents)
      if item.image_path != cached_path:
        cached_path = item.image_path
        try:
          cached_image = refer.load_image(item.image_path, item.height, item.width)
        except refer.BadImageError as e:
          if not task.skip_bad_images:
            raise refer.BadImageError(
              f"{e} (image_id={item.image_id}, ref_id={item.ref_id}); pass --skip_bad_images to skip its refs"
            ) from None
          cached_image = e
      if isinstance(cached_image, refer.BadImageError):
        skipped.append((item.ref_id, str(cached_image)))
        continue
      image, reencoded = cached_image
      mask = refer.decode_annotation_mask(
        item.segmentation, item.height, item.width, where=f"annotation {item.ann_id} (ref_id={item.ref_id})"
      )
      writer.write(
        records.make_example(
          image=image,
          height=item.height,
          width=item.width,
          mask=mask,
          ref_id=item.ref_id,
          ann_id=item.ann_id,
          image_id=item.image_id,
          category_id=item.category_id,
          bbox=item.bbox,
          sents=item.sents,
          sent_ids=item.sent_ids,
          tokens=item_tokens,
          reencoded=reencoded,
        )
      )
  return ShardResult(task.path, True, *read_back(task.path), skipped=tuple(skipped))


def check_split(tasks: Sequence[ShardTask], results: Dict[str, ShardResult], skip_bad_images: bool) -> Dict[str, int]:
  """Checks the records read back against the refs of every shard; returns the split's summary entry."""
  total_refs = total_sentences = reencoded = 0
  skipped: Dict[int, str] = {}
  for task in tasks:
    result = results[task.path]
    expected = {item.ref_id: item for item in task.items}
    found = result.ref_ids
    if len(set(found)) != len(found) or not set(found) <= set(expected):
      raise RuntimeError(f"shard {task.path} holds refs that do not belong to it (or duplicates); delete it and rerun")
    missing = sorted(set(expected) - set(found))
    reasons = dict(result.skipped)
    if not result.written and missing:
      if not skip_bad_images:
        raise RuntimeError(
          f"shard {task.path} lacks {len(missing)} refs (e.g. ref_id={missing[0]}): it was "
          "written with --skip_bad_images; delete it, or pass --skip_bad_images again"
        )
      reasons = {ref_id: "skipped by an earlier run" for ref_id in missing}
    if sorted(reasons) != missing:
      raise RuntimeError(f"shard {task.path}: the refs read back differ from those written")
    skipped.update(reasons)
    expected_sentences = sum(len(expected[ref_id].sents) for ref_id in found)
    if result.sentences != expected_sentences:
      raise RuntimeError(f"shard {task.path}: {result.sentences} sentences read back, {expected_sentences} expected")
    total_refs += len(found)
    total_sentences += result.sentences
    reencoded += result.reencoded
  return {
    "refs": total_refs,
    "sentences": total_sentences,
    "shards": len(tasks),
    "skipped_refs": len(skipped),
    "reencoded_refs": reencoded,
  }


def _init_worker() -> None:
  tf = import_tensorflow()
  # One thread per process: the parallelism comes from the processes.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def write_shards(tasks: Sequence[ShardTask], num_workers: int, desc: str) -> Iterator[ShardResult]:
  """Writes shards in `num_workers` spawned processes (here when <= 1), with a progress bar over refs.

  A process pool from concurrent.futures, because a worker that dies (killed for memory, say) then raises
  BrokenProcessPool instead of leaving the conversion waiting forever as multiprocessing.Pool would. A worker's
  error is raised here, in the calling process (the workers print nothing). The progress bar is shown only
  when stderr is a terminal.
  """
  with tqdm.tqdm(total=sum(len(t.items) for t in tasks), desc=desc, unit="ref", file=sys.stderr, disable=None) as bar:
    if num_workers <= 1:
      for task in tasks:
        yield write_shard(task)
        bar.update(len(task.items))
      return
    with concurrent.futures.ProcessPoolExecutor(
      min(num_workers, len(tasks)), initializer=_init_worker, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      futures = {pool.submit(write_shard, task): task for task in tasks}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield future.result()
          bar.update(len(futures[future].items))
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # Finish the running shards, drop the queued ones.
        raise
