"""Inference: ``Segmenter`` (images in, masks out), tiling, test-time augmentation, uncertainty, the inference
conversion (``optimize``) and the pictures drawn from masks."""
