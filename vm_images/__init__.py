"""Image files for the storage devices: a raw image for the VSIC, an ext4 image for the baseline.

``python -m vm_images create|attach|detach|mount|umount|list`` drives the same functions
from the command line; ``vm_images.instance`` is what ``kernelctl up`` and ``down`` call.
"""

from vm_images.images import (
    DEFAULT_IMAGE_DIR,
    DEFAULT_RAW_SIZE,
    ImageError,
    ImageInfo,
    ImageKind,
    LoopDevice,
    attach,
    create_ext4,
    create_raw,
    detach,
    detect_kind,
    image_info,
    list_images,
    loop_devices,
    mount,
    umount,
)

__all__ = [
    "DEFAULT_IMAGE_DIR",
    "DEFAULT_RAW_SIZE",
    "ImageError",
    "ImageInfo",
    "ImageKind",
    "LoopDevice",
    "attach",
    "create_ext4",
    "create_raw",
    "detach",
    "detect_kind",
    "image_info",
    "list_images",
    "loop_devices",
    "mount",
    "umount",
]
