"""Mixtures for the high-resolution stages (PaLI-X stage 2: OCR objectives plus detection)."""
from tasks.common import add_mixture

# PaLI-X's stage 2 continues on the OCR objectives (split-OCR, pix2struct) plus object
# detection; the rates here are ours (the paper does not publish them).
OCR_DETECTION_RATES = (
    ("synthetic_text_ocr", 0.35),
    ("synthetic_text_split_ocr", 0.25),
    ("synthetic_shapes_detection", 0.40),
)
add_mixture("pali_synthetic_ocr_detection", OCR_DETECTION_RATES)
