"""Self-supervised pretraining: slice index, PolyCL example selection, SimCLR, Pix2Rep, trainer."""

from .losses import nt_xent, pixel_nt_xent, polycl_triplet_loss
from .samplers import (
    METHODS,
    PolyCLMSampler,
    PolyCLOSampler,
    PolyCLSSampler,
    SamplerError,
    SliceSampler,
    TripletDraw,
    make_sampler,
)
from .slice_index import SliceIndex, SliceIndexError, build_slice_index, find_volumes, load_flags
from .trainer import PretrainConfig, PretrainResult, init_distributed, pretrain

__all__ = [
    "METHODS", "PolyCLMSampler", "PolyCLOSampler", "PolyCLSSampler", "PretrainConfig", "PretrainResult",
    "SamplerError", "SliceIndex", "SliceIndexError", "SliceSampler", "TripletDraw", "build_slice_index",
    "find_volumes", "init_distributed", "load_flags", "make_sampler", "nt_xent", "pixel_nt_xent",
    "polycl_triplet_loss", "pretrain",
]
