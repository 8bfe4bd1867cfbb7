"""Model families; importing this module registers them with timm."""
from .gsop_resnet import *  # noqa: F401,F403 (registers the gsop_* / gsop2_* models)
from . import gsop_attn_resnet, cbam_resnet, isqrt_resnet, preresnet_cifar  # noqa: F401 (registers the variants)
from ._builder import WeightsNotAvailableError
from ._checkpoint import CheckpointMismatchError, WarmStartWarning, detect_layout
