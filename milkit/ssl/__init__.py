"""Self-supervised (DINO) pretraining of a ViT on H&E tiles.

`MultiCropAugmentation` turns a batch of uint8 RGB tiles (`collate_tiles`) into DINO's
multi-crop views, in DataLoader workers (`AugmentingCollate`) or on the training device;
`DINOModule` trains on those batches, and `export_backbone` writes the teacher backbone as a
timm ``local-dir:`` folder.
"""

from milkit.ssl.augment import AugmentingCollate, MultiCropAugmentation, collate_tiles
from milkit.ssl.dino import DINOHead, DINOLoss
from milkit.ssl.dino_module import DINOModule
from milkit.ssl.export import export_backbone

__all__ = [
    "AugmentingCollate",
    "DINOHead",
    "DINOLoss",
    "DINOModule",
    "MultiCropAugmentation",
    "collate_tiles",
    "export_backbone",
]
