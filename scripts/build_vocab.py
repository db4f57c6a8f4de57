"""Rebuilds the shipped SentencePiece model, pali/data/assets/pali_synthetic_sp1049.model.

    python scripts/build_vocab.py [--out pali/data/assets/pali_synthetic_sp1049.model]

It trains a 1049-piece unigram model on the project's local corpus: the docstrings of the
Python standard library (pali.data.synthetic_text, train split only) plus the captions,
questions, answers, class names and prompts of the synthetic datasets. 1049 pieces plus the
1127 appended tokens (1024 locations, 3 UL2 modes, 100 sentinels) give 2176 ids.

Options are chosen so that text -> ids -> text is exact for any string: identity
normalisation, no whitespace collapsing, no dummy prefix, byte fallback for any character
not in the pieces. pad 0, eos 1, unk 2, no bos, as seqio expects.
The corpus depends a little on the Python version (it was built with 3.11); any version
gives a usable model.
"""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sentencepiece as spm  # noqa: E402

from pali.data import synthetic_scenes, synthetic_text  # noqa: E402

SP_SIZE = 1049
PROMPTS = ["caption en", "ocr", "detect", "answer en", "question en", " ; ", "noise"]


def sentences():
  out = []
  for doc in synthetic_text.stdlib_corpus()["train"]:
    out.extend(line for line in doc.split("\n") if line.strip())
  scene = synthetic_scenes.all_words()
  out.extend(scene * 3)  # the synthetic tasks' words should be single pieces
  out.extend(PROMPTS * 50)
  out.extend(" ".join(synthetic_scenes.SHAPES + synthetic_scenes.COLOR_NAMES).split() * 20)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "..", "pali", "data", "assets",
      f"pali_synthetic_sp{SP_SIZE}.model"))
  parser.add_argument("--vocab_size", type=int, default=SP_SIZE)
  args = parser.parse_args()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences()), model_writer=model, vocab_size=args.vocab_size,
      model_type="unigram", character_coverage=0.9995, byte_fallback=True,
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      minloglevel=2)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "wb") as f:
    f.write(model.getvalue())
  print(f"wrote {args.out} ({len(model.getvalue())} bytes, {args.vocab_size} pieces)")


if __name__ == "__main__":
  main()
