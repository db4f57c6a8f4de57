"""COCO detection metrics for pix2seq / PaliGemma-style decoded detection strings.

An object is written ``<locY1><locX1><locY2><locX2> label`` with ``<locNNNN>``, NNNN in
0000..1023 standing for NNNN / 1023 (normalised coordinates, order ymin, xmin, ymax, xmax);
objects are joined by ``;``. ``parse_detections`` reads such a string; an object that does
not match (fewer than four location tokens, no label, an index over 1023, ymax < ymin or
xmax < xmin) is skipped: it counts as no detection.

``coco_detection_metrics`` scores predictions against targets with pycocotools (mAP over IoU
.50:.95, AP50, AP75), building both COCO objects in memory on a nominal 1000 x 1000 image
(boxes are normalised, so the size only matters to the small/medium/large split, which we do
not report).
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Sequence

import numpy as np

NUM_LOC = 1024
_IMAGE_SIZE = 1000.0
_OBJECT = re.compile(
    r"^\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*([^<>]*?)\s*$")


def parse_detections(text: Any) -> list[tuple[np.ndarray, str]]:
  """``'<loc..>x4 label ; ...'`` -> [(box float [4] ymin, xmin, ymax, xmax in [0, 1], label)].

  Malformed objects are dropped (see module doc). An EOS/pad text residue is not expected:
  give the detokenized string.
  """
  if isinstance(text, (bytes, np.bytes_)):
    text = text.decode("utf-8")
  out = []
  for part in str(text).split(";"):
    m = _OBJECT.match(part)
    if m is None or not m.group(5):
      continue
    idx = [int(g) for g in m.groups()[:4]]
    if max(idx) >= NUM_LOC or idx[2] < idx[0] or idx[3] < idx[1]:
      continue
    out.append((np.asarray(idx, np.float64) / (NUM_LOC - 1), m.group(5)))
  return out


def _objects(item: Any, *, is_prediction: bool) -> list[tuple[np.ndarray, str, float]]:
  """A target/prediction item -> [(box, label, score)].

  Accepted: a detection string; a dict {'boxes': [[y1, x1, y2, x2], ...] normalised,
  'labels': [...], optional 'scores'} ; for predictions also (string, score) where score is
  one float for every object or a list with one per parsed object. Scores default to 1.0.
  """
  scores = None
  if isinstance(item, dict):
    boxes = np.asarray(item.get("boxes", []), np.float64).reshape(-1, 4)
    labels = [str(l) for l in item.get("labels", [])]
    if len(labels) != len(boxes):
      raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels in {item!r}.")
    objs = list(zip(boxes, labels))
    scores = item.get("scores")
  elif isinstance(item, (tuple, list)) and len(item) == 2 and is_prediction:
    objs = parse_detections(item[0])
    scores = item[1]
  else:
    objs = parse_detections(item)
  if scores is None:
    scores = [1.0] * len(objs)
  elif np.ndim(scores) == 0:
    scores = [float(scores)] * len(objs)
  elif len(scores) != len(objs):
    raise ValueError(f"{len(scores)} scores for {len(objs)} parsed objects in {item!r}; give "
                     "one score per well-formed object, or a single float.")
  return [(b, l, float(s)) for (b, l), s in zip(objs, scores)]


def _coco_box(box: np.ndarray) -> list[float]:
  y1, x1, y2, x2 = (float(v) * _IMAGE_SIZE for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def coco_detection_metrics(targets: Sequence[Any], predictions: Sequence[Any]
                           ) -> dict[str, float]:
  """COCO box AP: {'mAP': AP@[.5:.95], 'AP50', 'AP75'} in [0, 1] (pycocotools, 101-point
  interpolation, up to 100 detections per image). Categories are the distinct label strings
  of the targets; predicted labels absent from every target cannot match and are ignored,
  as COCO ignores classes outside its category list. NaN when the targets hold no object.
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
  gt_objs = [_objects(t, is_prediction=False) for t in targets]
  pr_objs = [_objects(p, is_prediction=True) for p in predictions]
  labels = sorted({l for objs in gt_objs for _, l, _ in objs})
  if not labels:
    return {"mAP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
  cat = {l: i + 1 for i, l in enumerate(labels)}

  images = [{"id": i + 1, "width": _IMAGE_SIZE, "height": _IMAGE_SIZE}
            for i in range(len(targets))]
  anns = []
  for i, objs in enumerate(gt_objs):
    for box, label, _ in objs:
      xywh = _coco_box(box)
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[label],
                   "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
  dets = []
  for i, objs in enumerate(pr_objs):
    for box, label, score in objs:
      if label in cat:
        xywh = _coco_box(box)
        dets.append({"id": len(dets) + 1, "image_id": i + 1, "category_id": cat[label],
                     "bbox": xywh, "area": xywh[2] * xywh[3], "score": score, "iscrowd": 0})
  if not dets:
    return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}

  categories = [{"id": c, "name": l} for l, c in cat.items()]
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": categories}
    gt.createIndex()
    dt = COCO()
    dt.dataset = {"images": images, "annotations": dets, "categories": categories}
    dt.createIndex()
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  stats = ev.stats
  return {"mAP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}
