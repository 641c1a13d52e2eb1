"""Networks and their files: the PolyCL U-Net / ResU-Net (``unet``), the 2.5D U-Net (``unet25d``), TransUNet,
the architecture ``registry``, safetensors ``checkpoints`` and the torch-free ``model_card`` helpers.

To add a network: a module here with a builder, one line in ``registry.MODEL_BUILDERS``.
"""

from ..exports import lazy_exports

EXPORTS = {
    **dict.fromkeys(("SegmentationNet", "UNetEncoder", "UNetDecoder", "InstanceNorm2d", "ProjectionHead",
                     "count_parameters"), "unet"),
    **dict.fromkeys(("MODEL_BUILDERS", "build_model", "check_input_size"), "registry"),
    **dict.fromkeys(("CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint", "save_model",
                     "default_card"), "checkpoints"),
    **dict.fromkeys(("STARTER_CHECKPOINT", "starter_checkpoint", "checkpoint_path", "describe_card"), "model_card"),
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
