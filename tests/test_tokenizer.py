"""Parity of fcnet_jax.tokenizer with CLIP's reference tokenizer (open_clip's SimpleTokenizer, pure Python)."""

import gzip
import hashlib
import random
import unicodedata

import numpy as np
import pytest

from fcnet_jax import tokenizer
import reference_impls  # tests/ is on sys.path (conftest.py).

# Referring expressions in the style of RefCOCO / RefCOCO+ / G-Ref, then the hard cases of CLIP's cleaning,
# pre-tokenization regex and byte-level BPE.
SENTENCES = [
  "man in red shirt on the left",
  "left guy",
  "the woman holding an umbrella",
  "far right zebra",
  "second banana from the left",
  "white car behind the bus",
  "A man wearing a black jacket and jeans is standing next to a bicycle near the entrance of the building.",
  "The giraffe whose head is bent down eating grass, closest to the camera, on the right side of the picture.",
  "bottom left corner bowl of broccoli",
  "kid in blue",
  "person sitting on couch, not the one with the laptop",
  "2nd from right",
  "the 3 donuts on top",
  "number 17 player",
  "price is $4.99 (on sale) -- 50% off!!!",
  "it's the dog's bowl",
  "don't pick the one that isn't red",
  "they're what we've got; I'm sure you'll see he'd left",
  "IT'S THE DOG'S TOY, THEY'RE HERE",
  "the man’s hat, “left” and ‘right’",
  "rock &amp; roll",
  "double &amp;lt;encoded&amp;gt; entity",
  "triple &amp;amp;lt;encoded&amp;amp;gt; entity &amp;amp;amp;",
  "&quot;quoted&quot; &#39;text&#39; &#x263A; &nbsp;space",
  "a &lt;b&gt; tag </w> and <|startoftext|> literally",
  "café crème brûlée naïve façade",
  "Straße und Grüße, ÆØÅ æøå",
  "e\u0301 decomposed accent and ﬁne ligature",
  "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ １２３",
  "mojibake: cafÃ© and donâ€™t",
  "一个穿红色衣服的男人",
  "左边的狗 and the cat",
  "Мужчина в красной рубашке слева",
  "رجل يرتدي قميصا أحمر",
  "लाल शर्ट में आदमी",
  "日本語のテキスト、カタカナ",
  "한국어 문장입니다",
  "Ελληνικά γράμματα ΣΊΣΥΦΟΣ",
  "emoji 😀 dog 🐶 family 👨‍👩‍👧 flag 🇯🇵 skin 👍🏽",
  "   leading and trailing spaces   ",
  "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2003em space",
  "multiple     spaces      between",
  "",
  "   ",
  "!!!",
  "?!?!... ---",
  "a!?b",
  "12345678901234567890",
  "3.14159 and 1,000,000 and 0x1F",
  "snake_case and kebab-case and CamelCase",
  "email me@example.com or visit http://example.com/path?q=1",
  "#hashtag @mention ~tilde ^caret `backtick` |pipe| \\backslash",
  "İstanbul ǅ digraph ſ long s ﬀ",
  "control\x00chars\x1b[31m here\x07",
  "supercalifragilisticexpialidocious antidisestablishmentarianism",
  "the man on the far left who is wearing a hat and holding a cup of coffee while talking on a phone "
  "and standing next to the tall woman in the green dress with a small brown dog on a leash",
  "a photo of a cat",
]


@pytest.fixture(scope="module")
def reference():
  return reference_impls.open_clip_module("tokenizer")


def test_shipped_vocabulary_is_clips(reference):
  """The package asset is the same BPE file open_clip ships (same decompressed content)."""
  import importlib.resources  # pylint: disable=g-import-not-at-top

  ours = importlib.resources.files("fcnet_jax").joinpath(tokenizer.VOCAB_RESOURCE).read_bytes()
  with open(reference_impls.open_clip_vocab_path(), "rb") as f:
    theirs = f.read()
  digest = lambda b: hashlib.sha256(gzip.decompress(b)).hexdigest()
  assert digest(ours) == digest(theirs)


def test_vocabulary_matches_reference(reference):
  merges = tokenizer._read_merges()  # pylint: disable=protected-access
  vocab = tokenizer.clip_vocabulary(merges)
  ref_encoder = reference.SimpleTokenizer().encoder
  assert len(vocab) == len(ref_encoder) == 49408
  # Same token string at every id below the specials (the reference names the specials differently).
  ref_by_id = {i: t for t, i in ref_encoder.items()}
  ours_by_id = {i: t for t, i in vocab.items()}
  assert all(ours_by_id[i] == ref_by_id[i] for i in range(tokenizer.SOT_TOKEN))
  assert tokenizer.clip_bpe().get_vocab_size() == 49408
  assert tokenizer.bytes_to_unicode() == reference.bytes_to_unicode()


def test_known_ids():
  # CLIP's ids for this sentence, as printed by OpenAI's clip.tokenize.
  np.testing.assert_array_equal(
    tokenizer.tokenize("a photo of a cat", context_length=10),
    np.array([[49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]], np.int32),
  )
  assert tokenizer.encode("A photo of a CAT.") == [320, 1125, 539, 320, 2368, 269]


@pytest.mark.parametrize("context_length", [17, 22, 77])
def test_sentences_match_reference(reference, context_length):
  assert len(SENTENCES) >= 50
  ours = tokenizer.tokenize(SENTENCES, context_length)
  theirs = reference.tokenize(SENTENCES, context_length).numpy()
  assert ours.shape == (len(SENTENCES), context_length) and ours.dtype == np.int32
  for sentence, row, ref_row in zip(SENTENCES, ours, theirs):
    np.testing.assert_array_equal(row, ref_row, err_msg=repr(sentence))


@pytest.mark.parametrize("context_length", [2, 3, 5, 8])
def test_tiny_context_lengths_match_reference(reference, context_length):
  np.testing.assert_array_equal(
    tokenizer.tokenize(SENTENCES, context_length), reference.tokenize(SENTENCES, context_length).numpy()
  )


def test_encode_matches_reference_without_truncation(reference):
  ref = reference.SimpleTokenizer()
  for sentence in SENTENCES:
    assert tokenizer.encode(sentence) == ref.encode(sentence), repr(sentence)


def _random_alphabet():
  return (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("'''''.,;:!?-_()[]{}<>/\\\"&#%$@*+=|~^`")
    + ["&amp;", "&lt;", "&#39;", "&amp;gt;", "'s", "'T"]
    + list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2003\u2028\u3000\u200b")
    + list("’‘“”«»…–—")
    + list("éèêëñüößàçøåæœ")
    + ["e\u0301", "a\u0308", "\u0345", "ſ", "İ", "K"]
    + list("ﬁﬂＡｂ１")
    + ["Ã©", "â€™", "Ã"]
    + list("一二三人狗猫左右的")
    + list("абвгдеёжзЯЖ")
    + list("αβγΣς")
    + list("عربية")
    + list("हिंदी")
    + list("0١٢३")
    + ["😀", "🐶", "👍🏽", "👨‍👩‍👧", "🇯🇵", "\ufe0f"]
    + ["\x00", "\x1b", "\x7f", "\u200d"]
  )


def test_random_strings_match_reference(reference):
  ref = reference.SimpleTokenizer()
  rng = random.Random(0)
  alphabet = _random_alphabet()
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(400)]
  ours = tokenizer.encode_batch(texts)
  for text, ids in zip(texts, ours):
    assert ids == ref.encode(text), repr(text)
  np.testing.assert_array_equal(tokenizer.tokenize(texts, 17), reference.tokenize(texts, 17).numpy())


def test_random_ascii_strings_match_reference(reference):
  """Printable ASCII skips ftfy/html.unescape in `clean_text`; check that shortcut changes nothing."""
  ref = reference.SimpleTokenizer()
  rng = random.Random(2)
  alphabet = [chr(c) for c in range(32, 127)] + ["e"] * 20 + [" "] * 15 + ["'s", "'ll", "&#38;", "\t"]
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(400)]
  for text, ids in zip(texts, tokenizer.encode_batch(texts)):
    assert ids == ref.encode(text), repr(text)


def test_random_code_points_match_reference(reference):
  """Each sampled assigned code point alone and between letters, digits and apostrophes (regex classes)."""
  ref = reference.SimpleTokenizer()
  rng = random.Random(1)
  code_points = []
  while len(code_points) < 1500:
    c = chr(rng.randrange(0x30000))
    # Skip surrogates, private use and code points unassigned in this Python's (older) Unicode database.
    if unicodedata.category(c) not in ("Cs", "Co", "Cn"):
      code_points.append(c)
  code_points += ["\u0345", "ſ", "K", "ß", "ǅ", "\u0130"]
  texts = [f"a{c}1'{c}x {c}{c}'s" for c in code_points]
  for text, ids in zip(texts, tokenizer.encode_batch(texts)):
    assert ids == ref.encode(text), repr(text)


def test_padding_truncation_and_single_string():
  tokens = tokenizer.tokenize(["left guy", SENTENCES[-2]], context_length=17)
  assert tokens.shape == (2, 17) and tokens.dtype == np.int32
  n = len(tokenizer.encode("left guy"))
  assert tokens[0, 0] == tokenizer.SOT_TOKEN and tokens[0, n + 1] == tokenizer.EOT_TOKEN
  assert (tokens[0, n + 2 :] == 0).all()
  # Too long: the first L-2 BPE tokens, then [EOS] in the last slot.
  long_ids = tokenizer.encode(SENTENCES[-2])
  assert len(long_ids) > 15
  np.testing.assert_array_equal(tokens[1], [tokenizer.SOT_TOKEN] + long_ids[:15] + [tokenizer.EOT_TOKEN])
  # Exactly L-2 tokens fit without truncation; a single str gives one row.
  fits = tokenizer.tokenize("a photo of a cat", context_length=7)
  np.testing.assert_array_equal(fits, [[49406, 320, 1125, 539, 320, 2368, 49407]])
  assert tokenizer.tokenize([], 17).shape == (0, 17)
  np.testing.assert_array_equal(tokenizer.tokenize("", 4), [[49406, 49407, 0, 0]])


def test_special_token_strings_are_plain_text():
  """A sentence cannot inject [SOS]/[EOS]: their spellings are tokenized as ordinary characters."""
  for text in ["<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>"]:
    ids = tokenizer.encode(text)
    assert len(ids) > 1 and tokenizer.SOT_TOKEN not in ids and tokenizer.EOT_TOKEN not in ids


def test_decode_round_trip():
  assert tokenizer.decode(tokenizer.tokenize("The man’s HAT &amp; a cat!", 17)[0]) == "the man 's hat & a cat !"
  assert tokenizer.decode(tokenizer.tokenize("一个男人 😀", 17)[0]) == "一个男人 😀"
  assert tokenizer.decode([]) == ""


def test_bad_input():
  with pytest.raises(ValueError, match="context_length"):
    tokenizer.tokenize("a cat", context_length=1)
  with pytest.raises(TypeError, match="context_length"):
    tokenizer.tokenize("a cat", context_length=17.0)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tokenizer.tokenize(["a cat", None])
  with pytest.raises(TypeError, match="str or a sequence"):
    tokenizer.tokenize(b"a cat")
  with pytest.raises(TypeError, match="str or a sequence"):
    tokenizer.tokenize(42)
  # A 0-d NumPy string array is one sentence (it was iterated and failed); a 0-d number is still refused.
  np.testing.assert_array_equal(tokenizer.tokenize(np.array("a cat"), 17), tokenizer.tokenize("a cat", 17))
  with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
    tokenizer.tokenize(np.array(3))
  with pytest.raises(TypeError, match="text must be a str"):
    tokenizer.encode(3)
  with pytest.raises(ValueError, match="outside CLIP's vocabulary"):
    tokenizer.decode([49408])
