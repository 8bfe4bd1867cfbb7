"""timm-gsop: Global Second-order Pooling networks (GSoP-Net, CVPR 2019) as timm models.

``import timm_gsop`` registers the models with timm, after which ``timm.create_model('gsop_resnet50')``
works like any timm model.
"""
from .version import __version__
from .layers import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403 (the import registers the models)
