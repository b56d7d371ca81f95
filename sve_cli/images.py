"""Images: reading them (folders, PIL images, HF's `{"bytes": …}`, arrays) and turning them into
the pixel values a checkpoint expects.

A checkpoint with a `preprocessor_config.json` (ViT, DINO, DINOv2, …) is fed through its own
`AutoImageProcessor` — resize, centre crop, rescale, normalise exactly as it was trained. Without
one (the seeded random ViT of `builtin:vit-tiny`, small test models) images are resized to the
model's `image_size` and normalised with mean 0.5, std 0.5, as HF's ViT processor would.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sve_cli.errors import SveError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
PROCESSOR = "preprocessor_config.json"


def image_tensor(image, where: str) -> torch.Tensor:
    """A PIL image, HF's {"bytes": …} form or an array -> `[C, H, W]` float in [0, 1] (C = 1 or 3)."""
    from PIL import Image

    if isinstance(image, dict) and image.get("bytes") is not None:
        image = Image.open(io.BytesIO(image["bytes"]))
    if isinstance(image, Image.Image):
        grey = image.mode in ("L", "1", "I", "F", "LA")
        array = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image, dtype=np.float32)
    tensor = torch.as_tensor(array)
    if tensor.dim() == 3 and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)[:3]  # HWC -> CHW, alpha dropped
    elif tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise SveError(f"{where}: an image has shape {list(array.shape)}; expected H×W, H×W×3 or 3×H×W")
    return tensor


def read_image_folder(root: Path) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """`root/<label>/*.png|jpg|…` -> (sorted label names, images `[C, H, W]`, label indices)."""
    from PIL import Image

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(path) as image:
                        images.append(image_tensor(image, str(path)))
                except OSError as error:
                    raise SveError(f"cannot read image {path}: {error}") from None
                labels.append(label)
    return names, images, labels


def _channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1)  # grey -> RGB
    if channels == 1:
        return image.mean(dim=0, keepdim=True)  # RGB -> grey
    raise SveError(f"images have {image.shape[0]} channels, the model expects {channels}")


def pixel_values(images: list[torch.Tensor], directory: Path, config: dict, image_size: int | None) -> torch.Tensor:
    """`[N, C, H, W]` model inputs for `[C, H, W]` images in [0, 1]; `image_size` (the recipe's)
    overrides the size the model was trained at."""
    channels = int(config.get("num_channels", 3))
    images = [_channels(image, channels) for image in images]
    if (directory / PROCESSOR).exists():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(directory)
        options = {"size": {"height": image_size, "width": image_size}} if image_size else {}
        arrays = [image.numpy() for image in images]  # already in [0, 1]: no rescaling by 1/255
        return processor(arrays, return_tensors="pt", do_rescale=False, input_data_format="channels_first",
                         **options)["pixel_values"].float()
    size = image_size or config.get("image_size")
    resized = []
    for image in images:
        if size is not None and tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        resized.append(image)
    if len({tuple(image.shape) for image in resized}) > 1:
        raise SveError("images differ in size; set task.image_size to resize them")
    return (torch.stack(resized) - 0.5) / 0.5  # [N, C, H, W]
