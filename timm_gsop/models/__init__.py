"""Model families; importing this module registers them with timm."""
from .gsop_resnet import *
from .preresnet_cifar import *
from .covpool_net import *
