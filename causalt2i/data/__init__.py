"""Data: reference-image loading and validation, merged training canvases, synthetic subjects."""

from causalt2i.data.images import ImageInputError, load_reference_image, load_subject_images, validate_image_bytes
from causalt2i.data.merge import Canvas, build_training_canvases, merge_subjects, nearest_bucket, sdxl_buckets

__all__ = [
    "Canvas",
    "ImageInputError",
    "build_training_canvases",
    "load_reference_image",
    "load_subject_images",
    "merge_subjects",
    "nearest_bucket",
    "sdxl_buckets",
    "validate_image_bytes",
]
