from .datamodule import ShardDataModule, collate, crop_hr, expand_urls
from .samples import BadSample, decode_rgb
from .shards import pack_folder

__all__ = ["BadSample", "ShardDataModule", "collate", "crop_hr", "decode_rgb", "expand_urls", "pack_folder"]
