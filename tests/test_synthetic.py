"""The embedded synthetic datasets: deterministic, consistent labels, disjoint splits."""
import os
import threading

import numpy as np

from pali.data import synthetic_scenes as sc
from pali.data import synthetic_text as st


def test_scenes_are_deterministic_and_consistent():
  a, b = sc.example("train", 17, 32), sc.example("train", 17, 32)
  assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
  for i in range(30):
    e = sc.example("train", i, 32)
    spec = sc.scene_spec("train", i)
    n = len(spec["objects"])
    assert 1 <= n <= 4 and e["boxes"].shape == (n, 4) and len(e["labels"]) == n
    assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
    assert np.all((e["boxes"] >= 0) & (e["boxes"] <= 1))
    assert np.all(e["boxes"][:, 2] > e["boxes"][:, 0]) and np.all(e["boxes"][:, 3] > e["boxes"][:, 1])
    for o in spec["objects"]:
      assert f"{o['color']} {o['shape']}" in e["caption"]
    qa = dict(zip(e["questions"], e["answers"]))
    assert qa["how many shapes are there?"] == str(n)
    for shape in sc.SHAPES:
      q = f"how many {shape}s are there?"
      if q in qa:
        assert qa[q] == str(sum(o["shape"] == shape for o in spec["objects"]))


def test_scene_pixels_match_boxes():
  e = sc.example("validation", 3, 64)
  spec = sc.scene_spec("validation", 3)
  for o, box in zip(spec["objects"], e["boxes"]):
    y, x = int((box[0] + box[2]) / 2 * 64), int((box[1] + box[3]) / 2 * 64)
    if o["shape"] in ("circle", "square", "diamond", "hexagon"):
      want = np.array(sc.COLORS[o["color"]])
      assert np.abs(e["image"][y, x].astype(int) - want).max() < 60


def test_scene_splits_never_share_an_example():
  key = lambda s: repr([(o["shape"], o["color"], round(o["cx"], 4), round(o["cy"], 4))
                        for o in s["objects"]])
  train = {key(sc.scene_spec("train", i)) for i in range(400)}
  val = {key(sc.scene_spec("validation", i)) for i in range(400)}
  assert not train & val
  assert all(sc._spec_split(sc.scene_spec("validation", i)) == "validation" for i in range(50))


def test_text_corpus_and_rendered_text():
  corpus = st.stdlib_corpus()
  assert len(corpus["train"]) > 200 and len(corpus["validation"]) > 5
  assert not set(corpus["train"]) & set(corpus["validation"])
  assert all(st.split_of(d) == "validation" for d in corpus["validation"])
  for i in range(10):
    e = st.text_example("train", i, 64)
    assert e["image"].shape == (64, 64, 3) and e["text"].strip() == e["text"] and e["text"]
    assert e["image"].std() > 0  # something is drawn
  assert st.text_example("train", 5, 64)["text"] == st.text_example("train", 5, 64)["text"]
  specs_t = {repr(st.text_spec("train", i)["lines"]) + str(st.text_spec("train", i)["bg"])
             for i in range(100)}
  specs_v = {repr(st.text_spec("validation", i)["lines"]) + str(st.text_spec("validation", i)["bg"])
             for i in range(100)}
  assert not specs_t & specs_v


def test_clean_text():
  raw = "Title\t here  now\n\n\n\n+----+----+\n|  a   |  b   |   c  |\nBody\x07 text.   \n"
  assert st.clean_text(raw) == "Title here now\n\nBody text."


def test_text_corpus_built_from_many_threads(tmp_path, monkeypatch):
  """tf.data renders in many threads; on a fresh machine (no corpus cache) they all ask for the
  corpus at once, and concurrent ast.parse calls crash CPython 3.11: one builds, all get it."""
  monkeypatch.setenv("PALI_CACHE_DIR", str(tmp_path))
  st._stdlib_corpus.cache_clear()
  results, errors = [], []

  def ask():
    try:
      results.append(st.stdlib_corpus())
    except Exception as e:  # noqa: BLE001 - the test reports any failure of any thread
      errors.append(e)

  threads = [threading.Thread(target=ask) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  st._stdlib_corpus.cache_clear()  # later tests read the usual cache again
  assert not errors, errors
  assert len(results) == 8 and all(r is results[0] for r in results)
  assert len(results[0]["train"]) > 200 and os.listdir(tmp_path)
