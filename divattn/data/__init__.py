"""Video data: a synthetic motion task, real video datasets, decoding, sampling, transforms."""

from .build import DATASETS, build_datasets
from .checks import DataError
from .datasets import (Skipped, VideoDataset, collate_skipping, read_kinetics_csv, read_path_label_list,
                       read_ssv2, read_ucf101)
from .decode import VideoDecodeError, read_frames, resolve_decoder
from .export import export_synthetic, write_video
from .sampling import EpochSampler, ShardSampler, split_key
from .synthetic import MotionParams, SyntheticMotion

__all__ = [
    "DATASETS", "build_datasets", "DataError", "Skipped", "VideoDataset", "collate_skipping", "read_kinetics_csv",
    "read_path_label_list", "read_ssv2", "read_ucf101", "VideoDecodeError", "read_frames", "resolve_decoder",
    "EpochSampler", "ShardSampler", "split_key", "MotionParams", "SyntheticMotion", "export_synthetic", "write_video",
]
