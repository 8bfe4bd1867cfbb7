"""Second-order ops and GSoP modules, usable without the models."""
from .second_order import TRACE_EPS, autocast_off, covariance_pool, isqrt, position_gram, triu_indices_flat, \
    triu_vectorize, upcast
from .gsop import GSOP_MANNERS, ChannelGSoP, CovarianceGate, GSoPFusion, PositionGSoP, RowConv2d, create_gsop
from .cov_pool import COV_POOL_TYPES, CovPool, ISqrtCovPool, create_cov_classifier
