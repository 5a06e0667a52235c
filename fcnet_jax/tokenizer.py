"""CLIP's byte-level BPE tokenizer, built offline from the shipped vocabulary (docs/data.md).

FCNet encodes a referring expression with CLIP's text encoder (paper sec. 3.1), so the sentence must be split
into exactly the ids CLIP was trained on: [SOS] BPE tokens [EOS], zero-padded to L (17 for RefCOCO/RefCOCO+,
22 for G-Ref), and a sentence longer than L is cut with [EOS] forced into the last slot (CLIP's
`tokenize(..., truncate=True)`).

The pipeline follows CLIP's reference `SimpleTokenizer`:
  1. cleaning (Python): `ftfy.fix_text`, `html.unescape` twice, strip, runs of whitespace -> one space,
     lower-case;
  2. pre-tokenization (`tokenizers` Split with CLIP's regex: contractions, letter runs, single digits, runs of
     other non-space characters), then the GPT-2/CLIP byte -> unicode map (`tokenizers` ByteLevel);
  3. BPE with CLIP's 48,894 ranked merges and the '</w>' end-of-word suffix (`tokenizers.models.BPE`).

CLIP's vocabulary (49,408 ids): the 256 byte symbols, the same with '</w>' (256..511), one token per merge
(512..49405), '<|startoftext|>' = 49406 and '<|endoftext|>' = 49407.

Known, documented differences from the reference (none occurs in English referring expressions):
  * Special-token strings inside the text ('<|startoftext|>', or open_clip's '<start_of_text>') are encoded
    as ordinary text; the reference turns them into the special ids. A sentence cannot inject [SOS]/[EOS].
  * Code points unassigned in Unicode 14 (e.g. U+0C5C): the regex engine inside `tokenizers` treats them as
    neither letter nor digit, whereas a recent `regex` package (the reference's) knows newer Unicode. For
    every code point Unicode 14 assigns, the pre-tokenization was checked equal to the reference's.
"""

import functools
import gzip
import html
import importlib.resources
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

VOCAB_RESOURCE = "assets/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file.
VOCAB_SIZE = 49408
SOT_TOKEN = 49406  # [SOS], '<|startoftext|>'
EOT_TOKEN = 49407  # [EOS], '<|endoftext|>'
PAD_TOKEN = 0  # CLIP pads with 0 (which is also the id of the byte symbol '!').
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's pre-tokenization pattern: contractions, letter runs, single digits, runs of anything else but space.
# The reference compiles it with re.IGNORECASE; on lower-cased text that changes only one match: "'ſ" (long
# s) is the contraction "'s". Spelling that out keeps the exact behaviour at half the cost of "(?i)".
_SPLIT_PATTERN = r"""'[sſ]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
# U+0345 (combining ypogegrammeni) case-folds to a letter, so under IGNORECASE the reference's `regex` never
# matches it: it separates tokens exactly like a space and is dropped. The Rust engine would keep it.
_DROPPED_LIKE_SPACE = "\u0345"


def bytes_to_unicode() -> Dict[int, str]:
  """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters.

  Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, NBSP, soft hyphen) map
  to U+0100 onwards in byte order. The dict's order is the order of vocabulary ids 0..255.
  """
  printable = [*range(ord("!"), ord("~") + 1)] + [*range(ord("¡"), ord("¬") + 1)] + [*range(ord("®"), ord("ÿ") + 1)]
  mapping = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in mapping]
  mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
  return mapping


def _read_merges() -> List[Tuple[str, str]]:
  """The ranked merges of the shipped vocabulary file (line 1 is a version header)."""
  resource = importlib.resources.files("fcnet_jax").joinpath(VOCAB_RESOURCE)
  with resource.open("rb") as f:
    lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(
      f"fcnet_jax/{VOCAB_RESOURCE}: expected {NUM_MERGES} merge lines of two symbols after "
      "the header; the vocabulary file is truncated or not CLIP's"
    )
  return merges


def clip_vocabulary(merges: Sequence[Tuple[str, str]]) -> Dict[str, int]:
  """CLIP's token -> id map: byte symbols, byte symbols + '</w>', merged tokens, then [SOS], [EOS]."""
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE or vocab["<|endoftext|>"] != EOT_TOKEN:
    raise ValueError(f"fcnet_jax/{VOCAB_RESOURCE}: built {len(vocab)} distinct tokens, expected CLIP's {VOCAB_SIZE}")
  return vocab


@functools.lru_cache(maxsize=1)
def clip_bpe() -> "tokenizers.Tokenizer":  # noqa: F821 (imported inside: optional at import time)
  """The `tokenizers` pipeline of steps 2-3 (pre-tokenization + BPE); cleaning happens in `clean_text`.

  Built once per process (~0.3 s) and shared; it is never mutated (no padding/truncation state), so sharing
  is safe. Special tokens are deliberately not registered: text is always encoded literally.
  """
  # Imported here so that the token-id constants above load without the tokenizer libraries (the GPU benchmark
  # machine, the input pipeline's readers).
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  merges = _read_merges()
  bpe = models.BPE(
    vocab=clip_vocabulary(merges),
    merges=merges,
    end_of_word_suffix="</w>",
    continuing_subword_prefix="",
    fuse_unk=False,
    ignore_merges=False,
  )
  tokenizer = tokenizers.Tokenizer(bpe)
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def clean_text(text: str) -> str:
  """CLIP's text cleaning ('lower'): fix mojibake, unescape HTML twice, fold whitespace, lower-case."""
  # ftfy costs about as much as the BPE itself; printable ASCII without '&' (most referring expressions) has
  # nothing for ftfy or html.unescape to change, so skip them there.
  if not (text.isascii() and text.isprintable() and "&" not in text):
    import ftfy  # pylint: disable=g-import-not-at-top

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  text = " ".join(text.split()).lower()  # str.split(): every unicode whitespace run, as the reference.
  return text.replace(_DROPPED_LIKE_SPACE, " ")


def _check_text(text: object, where: str) -> str:
  if not isinstance(text, str):
    raise TypeError(f"fcnet_jax.tokenizer: {where} must be a str, got {type(text).__name__}: {text!r:.80}")
  return text


def encode_batch(texts: Sequence[str]) -> List[List[int]]:
  """BPE ids of each text, without [SOS]/[EOS] (any length). Uses the library's parallel batch encode."""
  if isinstance(texts, str):
    raise TypeError("fcnet_jax.tokenizer.encode_batch: texts must be a sequence of str, got a single str")
  cleaned = [clean_text(_check_text(t, f"texts[{i}]")) for i, t in enumerate(texts)]
  encodings = clip_bpe().encode_batch_fast(cleaned, add_special_tokens=False)  # No character offsets.
  return [e.ids for e in encodings]


def encode(text: str) -> List[int]:
  """BPE ids of one text, without [SOS]/[EOS]; e.g. 'a photo of a cat' -> [320, 1125, 539, 320, 2368]."""
  return encode_batch([_check_text(text, "text")])[0]


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """CLIP's `tokenize(texts, context_length, truncate=True)` as NumPy.

  Args:
    texts: one sentence or a sequence of N sentences.
    context_length: L >= 2 (77 for CLIP; 17 for RefCOCO/RefCOCO+, 22 for G-Ref).

  Returns:
    N×L int32 (N = 1 for a single str): [SOS] tokens [EOS] then 0s. A sentence of more than L-2 tokens keeps
    its first L-2 tokens and ends with [EOS] in slot L-1.
  """
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
    raise TypeError(f"fcnet_jax.tokenizer.tokenize: context_length must be an int, got {context_length!r}")
  if context_length < 2:
    raise ValueError(
      f"fcnet_jax.tokenizer.tokenize: context_length must be >= 2 to hold [SOS] and [EOS], got {context_length}"
    )
  if isinstance(texts, np.ndarray) and texts.ndim == 0:  # np.array("a dog"): one sentence.
    texts = [texts.item()]
  if isinstance(texts, str):
    texts = [texts]
  elif isinstance(texts, bytes) or not isinstance(texts, (Sequence, np.ndarray)):
    raise TypeError(
      f"fcnet_jax.tokenizer.tokenize: texts must be a str or a sequence of str, got {type(texts).__name__}"
    )
  ids = encode_batch(list(texts))
  out = np.full((len(ids), context_length), PAD_TOKEN, dtype=np.int32)
  for row, tokens in zip(out, ids):
    body = tokens[: context_length - 2]
    row[0] = SOT_TOKEN
    row[1 : len(body) + 1] = body
    row[len(body) + 1] = EOT_TOKEN
  return out


def decode(ids: Sequence[int]) -> str:
  """Text of token ids (e.g. a row of `tokenize`): stops at [EOS], skips [SOS]; words joined by spaces.

  Like CLIP's decode it gives the cleaned text: lower-case, with one space after every word ('a cat .' style
  punctuation spacing is not restored), trailing space stripped.
  """
  tokenizer = clip_bpe()
  symbols = []
  for i in ids:
    i = int(i)
    if i == EOT_TOKEN:
      break
    if i == SOT_TOKEN:
      continue
    if not 0 <= i < VOCAB_SIZE:
      raise ValueError(f"fcnet_jax.tokenizer.decode: id {i} is outside CLIP's vocabulary [0, {VOCAB_SIZE})")
    symbols.append(tokenizer.id_to_token(i))
  return tokenizer.decoder.decode(symbols).replace("</w>", " ").strip()
