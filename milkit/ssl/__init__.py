"""Self-supervised (DINO) pretraining of a ViT on H&E tiles.

`MultiCropAugmentation` turns a uint8 RGB tile into DINO's multi-crop views (use it inside
DataLoader workers, with `collate_crops` as ``collate_fn``), `DINOModule` trains on those
batches, and `export_backbone` writes the teacher backbone as a timm ``local-dir:`` folder.
"""

from milkit.ssl.augment import MultiCropAugmentation, collate_crops
from milkit.ssl.dino import DINOHead, DINOLoss
from milkit.ssl.dino_module import DINOModule
from milkit.ssl.export import export_backbone

__all__ = [
    "DINOHead",
    "DINOLoss",
    "DINOModule",
    "MultiCropAugmentation",
    "collate_crops",
    "export_backbone",
]
