"""ResNet blocks that end in a GSoP module."""
import torch
from torch import Tensor

from timm.models.resnet import Bottleneck

from ..layers.gsop import ChannelGSoP
from ..layers.gsop_fused import bn_gsop_add_relu, fused_training_applies

__all__ = ['GSoPBottleneck', 'set_fused']


class GSoPBottleneck(Bottleneck):
    """timm's ``Bottleneck`` (same arguments, modules and state dict) whose end ``bn3 -> se -> + shortcut``
    runs through :func:`~timm_gsop.layers.gsop_fused.bn_gsop_add_relu` in training when ``se`` is a channel
    GSoP module: it keeps no copy of the ``bn3`` output for backward, and changes nothing observable (that
    module says when it applies: no hooks on the bypassed modules, plain ``BatchNorm2d``, eager fp32/fp64 ...).

    Everywhere else (inference, drop-path, other GSoP manners, hooks, SyncBN / frozen BN, TorchScript, fx,
    torch.compile, torch.func, autocast), and always with ``fused = False``, it runs timm's ``Bottleneck``
    order exactly.
    """
    fused: bool = True

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        if not torch.jit.is_scripting():
            if self.fused and type(self.se) is ChannelGSoP and self.drop_path is None:
                if fused_training_applies(self.bn3, self.se, x):
                    if self.downsample is not None:
                        shortcut = self.downsample(shortcut)
                    return bn_gsop_add_relu(x, self.bn3, self.se, shortcut, self.act3)

        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x

def set_fused(model: torch.nn.Module, enable: bool = True) -> None:
    """Turn the cheaper route of every :class:`GSoPBottleneck` in ``model`` on or off."""
    for m in model.modules():
        if isinstance(m, GSoPBottleneck):
            m.fused = bool(enable)
