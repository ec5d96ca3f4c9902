"""Loading user images with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

from mmkit.errors import MmkitError


def load_image(source):
    """A PIL RGB image from a path, PIL image or HxWx3 uint8 array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        import numpy as np

        array = np.asarray(source)
        if array.ndim != 3 or array.shape[2] != 3:
            raise MmkitError(f"image arrays must be H x W x 3, got shape {tuple(array.shape)}")
        return Image.fromarray(array.astype("uint8"), "RGB")
    path = Path(source)
    if not path.is_file():
        raise MmkitError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()  # decode fully now: a truncated file must fail here, not inside the model
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MmkitError(f"{str(path)!r} is not a readable image ({type(err).__name__}); pass a PNG or JPEG file") from None
