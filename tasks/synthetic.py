"""Tasks on the embedded synthetic datasets (no downloads; see pali.data.synthetic) and the
`pali_synthetic_pretrain` mixture the quickstart trains on."""
import functools

from pali.data import denoising
from pali.data import detection
from pali.data import preprocessors as pp
from pali.data import synthetic
from tasks.common import TAIL, add_mixture
from tasks.common import add_task as _add_task

# The sources are already perfectly shuffled (a seeded permutation of the example indices),
# so the post-preprocessing shuffle buffer only needs to be small (it is filled before the
# first batch, and rendering is the costly step).
add_task = functools.partial(_add_task, shuffle_buffer_size=64)

add_task("synthetic_shapes_caption", synthetic.shapes_source("synthetic_shapes_caption"),
         [synthetic.render_shapes, pp.caption, pp.prepare_images, *TAIL])
add_task("synthetic_shapes_split_caption", synthetic.shapes_source("synthetic_shapes_split_caption"),
         [synthetic.render_shapes, pp.split_caption, pp.prepare_images, *TAIL])
add_task("synthetic_shapes_vqa", synthetic.shapes_source("synthetic_shapes_vqa"),
         [synthetic.render_shapes, pp.vqa, pp.prepare_images, *TAIL])
add_task("synthetic_shapes_detection", synthetic.shapes_source("synthetic_shapes_detection"),
         [synthetic.render_shapes, detection.detection, pp.prepare_images, *TAIL])
add_task("synthetic_shapes_detection_augmented", synthetic.shapes_source("synthetic_shapes_detection_augmented"),
         [synthetic.render_shapes,
          functools.partial(detection.detection, num_noise_boxes=4),
          pp.prepare_images, *TAIL])
add_task("synthetic_text_ocr", synthetic.text_image_source("synthetic_text_ocr"),
         [synthetic.render_text, pp.ocr, pp.prepare_images, *TAIL])
add_task("synthetic_text_split_ocr", synthetic.text_image_source("synthetic_text_split_ocr"),
         [synthetic.render_text, pp.split_ocr, pp.prepare_images, *TAIL])
# UL2 denoising on text only (zero images) ...
add_task("synthetic_stdlib_ul2", synthetic.stdlib_corpus_source(),
         [functools.partial(pp.rekey, key_map={"targets": "text"}), pp.tokenize,
          denoising.ul2_denoise, pp.add_empty_images, *TAIL])
# ... and on image + text (the caption is denoised, the image is kept).
add_task("synthetic_shapes_caption_ul2", synthetic.shapes_source("synthetic_shapes_caption_ul2"),
         [synthetic.render_shapes, functools.partial(pp.rekey, key_map={
             "targets": "caption", "image": "image"}), pp.tokenize,
          denoising.ul2_denoise, pp.prepare_images, *TAIL])

# The quickstart mixture. Rates (sum 1): captioning and split captioning 0.15 each,
# OCR and split-OCR 0.1 each, detection 0.15, VQA 0.15, UL2 denoising on text 0.2.
PRETRAIN_RATES = (
    ("synthetic_shapes_caption", 0.15),
    ("synthetic_shapes_split_caption", 0.15),
    ("synthetic_text_ocr", 0.10),
    ("synthetic_text_split_ocr", 0.10),
    ("synthetic_shapes_detection", 0.15),
    ("synthetic_shapes_vqa", 0.15),
    ("synthetic_stdlib_ul2", 0.20),
)
add_mixture("pali_synthetic_pretrain", PRETRAIN_RATES)

# The four measured tasks only (gin_configs/runs/learn_cpu.gin; BENCHMARKS.md "Learning").
add_mixture("pali_synthetic_learn", (
    ("synthetic_shapes_detection", 0.3),
    ("synthetic_text_ocr", 0.3),
    ("synthetic_shapes_caption", 0.2),
    ("synthetic_shapes_vqa", 0.2),
))
