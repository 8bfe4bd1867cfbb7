"""ResNet blocks that end in a GSoP module."""
import torch
from torch import Tensor

from timm.models.resnet import Bottleneck

from ..layers.gsop import ChannelGSoP

__all__ = ['GSoPBottleneck']


class GSoPBottleneck(Bottleneck):
    """timm's ``Bottleneck`` (same arguments, modules and state dict) whose end ``bn3 -> se -> + shortcut``
    runs through :meth:`ChannelGSoP.forward_bn_add` when ``se`` is a channel GSoP module.

    That saves a full pass over the block output (``x * a + shortcut`` in one op) and, in training, the
    copy of the ``bn3`` output the attention product would otherwise keep for backward. Blocks without a
    channel GSoP module, with drop-path, or under TorchScript run exactly timm's ``Bottleneck`` order.
    """

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
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)

        if not torch.jit.is_scripting():
            if isinstance(self.se, ChannelGSoP) and self.drop_path is None:
                return self.act3(self.se.forward_bn_add(x, self.bn3, shortcut))

        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        x += shortcut
        return self.act3(x)
