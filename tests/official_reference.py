"""Test oracle, independent of ``timm_gsop`` (never import it here): the forward pass of the RELEASED GSoP-Net code
(github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks: ``torchvision/models/resnet.py``,
``MPNCOV/python/MPNCOV.py``, ``main.py``) and of fast-MPN-COV's iSQRT-COV ResNet (at the end), rewritten for checking.

Promises: ``state_dict()`` keys and shapes are those of the released ``ResNet``, and the eval-mode forward computes
what the released forward computes, in the module's dtype (float64 works). Differences that change no eval output:
GSoP-Net1 pools with a mean instead of ``AvgPool2d(14)`` (small inputs work); plain autograd instead of the custom
Functions; no prints, no ``.cuda()``.
"""
import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# main.py's --att_manner -> the one-character code the released Bottleneck switches on
MANNER_TO_CODE = {'channel': '1', 'position': '2', 'fusion_avg': '+', 'fusion_max': 'M', 'fusion_concat': '&'}
NO_ATTENTION = '0'
STAGE_DEPTHS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}

# dimensions hard-wired in the released code
ATT_DIM = 128          # main.py --attdim default
POSITION_GRID = 8      # sp_h = sp_w = 8
ROW_EXPANSION = 4      # row-wise conv: 4 outputs per row
ISQRT_DIM = 256        # GSoP-Net2 head reduction
ISQRT_ITERS = 3        # GSoP-Net2: MPNCOV.SqrtmLayer(x, 3)
EXPANSION = 4          # Bottleneck.expansion


def released_attention_layout(arch: str, gsop_mode: int, manner: str) -> List[List[str]]:
    """Per stage, per block, the attention code, built the way main.py builds ``args.attpos``."""
    if arch not in STAGE_DEPTHS:
        raise ValueError(f'unknown arch {arch!r}')
    if gsop_mode not in (1, 2):
        raise ValueError(f'unknown GSoP_mode {gsop_mode!r}')
    code = MANNER_TO_CODE[manner]
    layout = [[NO_ATTENTION] * (depth - 1) + [code] for depth in STAGE_DEPTHS[arch]]
    if gsop_mode == 2:
        layout[-1][-1] = NO_ATTENTION  # GSoP-Net2: no block in the last stage
    return layout


# ---- second-order helpers (MPNCOV.py and resnet.py's cov_feature), dtype-following -------------------

def released_channel_covariance(x: torch.Tensor) -> torch.Tensor:
    """MPNCOV ``Covpool``: ``X I_hat X^T``, (B, C, H, W) -> (B, C, C), the explicit ``M x M`` centring matrix
    ``I_hat = (1/M) I_M - (1/M^2) 1 1^T``, ``M = H * W``, repeated per sample as released."""
    b, c, m = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    feats, dd = x.reshape(b, c, m), dict(dtype=x.dtype, device=x.device)
    centring = torch.eye(m, **dd) / m - torch.ones(m, m, **dd) / (m * m)
    return feats.bmm(centring.repeat(b, 1, 1)).bmm(feats.transpose(1, 2))


def released_position_covariance(x: torch.Tensor) -> torch.Tensor:
    """resnet.py ``cov_feature``: ``X^T I_hat X``, (B, C, H, W) -> (B, M, M), with a ``C x C`` ``I_hat`` scaled by
    the number of POSITIONS: ``(1/M) I_C - (1/M^2) 1 1^T``. Not a covariance unless C == M; as released."""
    b, c, m = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    feats, dd = x.reshape(b, c, m), dict(dtype=x.dtype, device=x.device)
    centring = torch.eye(c, **dd) / m - torch.ones(c, c, **dd) / (m * m)
    return feats.transpose(1, 2).bmm(centring.expand(b, c, c)).bmm(feats)


def released_sqrtm(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """MPNCOV ``Sqrtm`` step for step: coupled Newton-Schulz, trace pre-normalisation, sqrt(trace) after. For
    ``iterations < 2`` it returns, as released, the ``0.5 (3I - A)`` factor times sqrt(trace) (3 and 5 are used)."""
    batch, dim, _ = x.shape
    three_eye = 3.0 * torch.eye(dim, dtype=x.dtype, device=x.device).repeat(batch, 1, 1)  # per sample, as released
    trace = (x * three_eye).sum(dim=(1, 2)) / 3.0          # normA: the trace, written as in the release
    a = x / trace.view(batch, 1, 1)
    zy = 0.5 * (three_eye - a)
    if iterations >= 2:
        y_prev = a.bmm(zy)                                  # Y[:, 0]
        z_prev = zy                                         # Z[:, 0]
        for _ in range(1, iterations - 1):
            t = 0.5 * (three_eye - z_prev.bmm(y_prev))
            y_prev, z_prev = y_prev.bmm(t), t.bmm(z_prev)
        zy = 0.5 * y_prev.bmm(three_eye - z_prev.bmm(y_prev))
    return zy * trace.sqrt().view(batch, 1, 1)


def released_triu_vector(x: torch.Tensor) -> torch.Tensor:
    """MPNCOV ``Triuvec`` forward: entries at the nonzeros of ``ones(d, d).triu().t()`` (flattened row
    major), i.e. the lower triangle with diagonal, read row by row, one sample at a time as released.
    (B, d, d) -> (B, d (d + 1) / 2)."""
    batch, dim, _ = x.shape
    flat, index = x.reshape(batch, dim * dim), released_triu_index(dim).to(x.device)
    return torch.stack([flat[i, index] for i in range(batch)])


def released_triu_index(dim: int) -> torch.Tensor:
    """``Triuvec``'s flat indices: the nonzeros of ``ones(d, d).triu().t()``, row major."""
    return torch.ones(dim, dim).triu().t().reshape(dim * dim).nonzero().reshape(-1)


# ---- network ----------------------------------------------------------------------------------------

class OfficialBottleneck(nn.Module):
    """The released ``Bottleneck`` (stride on conv2) with its attention slot; submodules carry the released
    attribute names, parameter-free ops are functional."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 attention: str = NO_ATTENTION, att_dim: int = ATT_DIM) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.attention = attention
        if attention in ('1', '+', 'M', '&'):  # the channel branch
            # released: "if planes > 64: DR_stride = 1 else: DR_stride = 2" (i.e. stage 1 only)
            self.conv_for_DR = nn.Conv2d(out_channels, att_dim, kernel_size=1, stride=1 if planes > 64 else 2)
            self.bn_for_DR = nn.BatchNorm2d(att_dim)
            self.row_bn = nn.BatchNorm2d(att_dim)
            self.row_conv_group = nn.Conv2d(att_dim, ROW_EXPANSION * att_dim, (att_dim, 1), groups=att_dim)
            self.fc_adapt_channels = nn.Conv2d(ROW_EXPANSION * att_dim, out_channels, kernel_size=1)
        if attention in ('2', '+', 'M', '&'):  # the position branch
            positions = POSITION_GRID * POSITION_GRID
            self.conv_for_DR_spatial = nn.Conv2d(out_channels, att_dim, kernel_size=1)
            self.bn_for_DR_spatial = nn.BatchNorm2d(att_dim)
            self.row_bn_for_spatial = nn.BatchNorm2d(positions)
            self.row_conv_group_for_spatial = nn.Conv2d(
                positions, ROW_EXPANSION * positions, (positions, 1), groups=positions)
            self.fc_adapt_channels_for_spatial = nn.Conv2d(ROW_EXPANSION * positions, positions, kernel_size=1)
        if attention == '&':
            # released arithmetic, kept literally (math.log(., 2), int truncation)
            groups = int(out_channels / 64)
            factor = int(math.log(32 / groups, 2))
            for name in ('dilate_conv_for_concat1', 'dilate_conv_for_concat2'):
                setattr(self, name, nn.Conv2d(out_channels, out_channels, kernel_size=(factor * 2 + 5, 1),
                                              padding=(factor + 2, 0), groups=groups))
            self.bn_for_concat = nn.BatchNorm2d(out_channels)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Released chan_att: weights (B, C, 1, 1)."""
        y = F.relu(self.bn_for_DR(self.conv_for_DR(F.relu(x))))
        rows = released_channel_covariance(y).unsqueeze(-1)  # (B, d, d, 1): row i is "channel" i
        return torch.sigmoid(self.fc_adapt_channels(self.row_conv_group(self.row_bn(rows))))  # no act (released)

    def position_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Released pos_att: weights (B, 1, H, W)."""
        y = self.bn_for_DR_spatial(self.conv_for_DR_spatial(F.relu(x)))  # no ReLU here (released)
        mat = released_position_covariance(F.adaptive_avg_pool2d(y, (POSITION_GRID, POSITION_GRID)))  # (B, 64, 64)
        q = F.relu(self.row_conv_group_for_spatial(self.row_bn_for_spatial(mat.unsqueeze(-1))))
        w = torch.sigmoid(self.fc_adapt_channels_for_spatial(q)).reshape(-1, 1, POSITION_GRID, POSITION_GRID)
        return F.adaptive_avg_pool2d(w, (x.shape[2], x.shape[3]))  # "unpool" to H x W

    def apply_attention(self, x: torch.Tensor) -> torch.Tensor:
        code = self.attention
        if code == NO_ATTENTION:
            return x
        by_channel = x * self.channel_weights(x) if code != '2' else None
        by_position = F.relu(x * self.position_weights(x)) if code != '1' else None
        if code in ('1', '2'):
            return by_channel if code == '1' else by_position
        if code == '+':
            return by_channel + by_position
        if code == 'M':
            return torch.max(by_channel, by_position)
        return self.bn_for_concat(self.dilate_conv_for_concat1(by_channel) + self.dilate_conv_for_concat2(by_position))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.apply_attention(out)
        return F.relu(out + shortcut)


class OfficialGSoPResNet(nn.Module):
    """The released ``ResNet`` (GSoP-Net1 / GSoP-Net2), layer4 at stride 1 without dilation."""

    def __init__(self, depths: Sequence[int], layout: List[List[str]], gsop_mode: int,
                 num_classes: int = 1000, att_dim: int = ATT_DIM) -> None:
        super().__init__()
        self.gsop_mode = gsop_mode
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        stage_planes = (64, 128, 256, 512)
        stage_strides = (1, 2, 2, 1)  # released: layer4 stride=1
        for idx, (planes, stride, depth, codes) in enumerate(zip(stage_planes, stage_strides, depths, layout)):
            assert len(codes) == depth
            downsample = nn.Sequential(  # every first block (stride or width changes in each stage)
                nn.Conv2d(inplanes, planes * EXPANSION, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION))
            blocks = [OfficialBottleneck(inplanes, planes, stride, downsample, codes[0], att_dim)]
            blocks += [OfficialBottleneck(planes * EXPANSION, planes, attention=code, att_dim=att_dim)
                       for code in codes[1:]]
            inplanes = planes * EXPANSION
            setattr(self, f'layer{idx + 1}', nn.Sequential(*blocks))
        if gsop_mode == 1:
            self.fc = nn.Linear(inplanes, num_classes)
        else:
            self.layer_reduce = nn.Conv2d(inplanes, ISQRT_DIM, kernel_size=1, bias=False)
            self.layer_reduce_bn = nn.BatchNorm2d(ISQRT_DIM)
            self.fc = nn.Linear(ISQRT_DIM * (ISQRT_DIM + 1) // 2, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for idx in range(1, 5):
            x = getattr(self, f'layer{idx}')(x)
        return x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.gsop_mode == 1:
            return x.mean(dim=(2, 3))  # == AvgPool2d(14) on the released 14x14 map
        x = released_channel_covariance(F.relu(self.layer_reduce_bn(self.layer_reduce(x))))
        return released_triu_vector(released_sqrtm(x, ISQRT_ITERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(self.forward_features(x)))


def build_official(arch: str = 'resnet50', gsop_mode: int = 1, manner: str = 'channel',
                   num_classes: int = 1000) -> OfficialGSoPResNet:
    """The released network as main.py builds it for ``-a arch --GSoP_mode gsop_mode --att_manner manner``."""
    layout = released_attention_layout(arch, gsop_mode, manner)
    return OfficialGSoPResNet(STAGE_DEPTHS[arch], layout, gsop_mode, num_classes=num_classes)


# convs whose output goes through a sigmoid; randomize_ sets the spread of their outputs
GATE_CONV_NAMES = ('fc_adapt_channels', 'fc_adapt_channels_for_spatial')
GATE_LOGIT_STD = 1.0


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, calibration_input: torch.Tensor = None) -> nn.Module:
    """Fill every parameter and BatchNorm buffer with seeded random values of a sane scale (convs kaiming fan_in,
    BN affine ~ U(0.5, 1.5) / U(-0.2, 0.2), linear N(0, 1 / fan_in)), none at PyTorch's defaults, so a tensor a
    loader leaves at its init changes the output. BN running statistics are calibrated in one eval pass over
    ``calibration_input`` (default a seeded 8x3x64x64 batch): each BN, before it runs, takes its input's per-channel
    mean (+ 0.2 std noise) and variance (x U(0.5, 2)), so a deep network's activations stay O(1) without any BN
    being exact; the convs that feed a sigmoid are rescaled so their outputs have std ``GATE_LOGIT_STD`` and the
    gates vary between samples, channels and positions. Leaves the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)

    rand = lambda shape, low, high: torch.rand(shape, generator=gen).mul_(high - low).add_(low)  # noqa: E731
    randn = lambda shape, std: torch.randn(shape, generator=gen).mul_(std)  # noqa: E731

    norms = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()  # in_channels / groups * kh * kw
            module.weight.copy_(randn(module.weight.shape, math.sqrt(2.0 / fan_in)))
            if module.bias is not None:
                module.bias.copy_(rand(module.bias.shape, -0.2, 0.2))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.copy_(rand(module.weight.shape, 0.5, 1.5))
            module.bias.copy_(rand(module.bias.shape, -0.2, 0.2))
            module.running_mean.copy_(randn(module.running_mean.shape, 0.2))
            module.running_var.copy_(rand(module.running_var.shape, 0.5, 2.0))
            module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
            norms.append(module)
        elif isinstance(module, nn.Linear):
            module.weight.copy_(randn(module.weight.shape, math.sqrt(1.0 / module.in_features)))
            if module.bias is not None:
                module.bias.copy_(rand(module.bias.shape, -0.1, 0.1))

    def calibrate(bn: nn.Module, args) -> None:
        x = args[0].double().transpose(0, 1).flatten(1)
        mean, var = x.mean(dim=1), x.var(dim=1, unbiased=False).clamp_min(1e-6)
        bn.running_mean.copy_(mean + 0.2 * var.sqrt() * randn(mean.shape, 1.0))
        bn.running_var.copy_(var * rand(var.shape, 0.5, 2.0))

    def calibrate_gate(conv: nn.Module, args) -> None:
        logits = conv._conv_forward(args[0], conv.weight, None)
        conv.weight.mul_(GATE_LOGIT_STD / logits.std().clamp_min(1e-6))

    gate_convs = [m for name, m in model.named_modules() if name.split('.')[-1] in GATE_CONV_NAMES]
    if calibration_input is None:
        calibration_input = torch.randn(8, 3, 64, 64, generator=gen)
    param = next(model.parameters())
    handles = [bn.register_forward_pre_hook(calibrate) for bn in norms]
    handles += [conv.register_forward_pre_hook(calibrate_gate) for conv in gate_convs]
    try:
        model.eval()(calibration_input.to(device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return model


# ---- fast-MPN-COV (iSQRT-COV) ------------------------------------------------------------------------

# fast-MPN-COV's MPNCOVResNet children, in order (main.py's `features` is a Sequential of them)
MPNCOV_CHILDREN = ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4',
                   'layer_reduce', 'layer_reduce_bn', 'layer_reduce_relu', 'fc']


def mpncov_resnet(depth=50, num_classes=1000, device=None, seed=0):
    """fast-MPN-COV's MPNCOVResNet: a torchvision ResNet (its Bottleneck and key names) with a stride-1 layer4,
    ``layer_reduce`` (1x1 conv 2048 -> 256, no bias), ``layer_reduce_bn`` and a 32,896-class-input ``fc``."""
    torch.manual_seed(seed)
    ctor = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    net = ctor(weights=None, num_classes=num_classes).to(device)
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    net.layer_reduce = nn.Conv2d(2048, 256, 1, bias=False, device=device)
    net.layer_reduce_bn = nn.BatchNorm2d(256, device=device)
    net.fc = nn.Linear(256 * 257 // 2, num_classes, device=device)
    del net.avgpool
    return net


def mpncov_forward(net, x, iters=5):
    """Its forward: ReLU after the reduction, the M x M centring covariance, coupled Newton-Schulz (trace
    normalised), the upper triangle read row by row (GSoP-Net's Triuvec reads the lower one), ``fc``."""
    x = net.maxpool(F.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    x = F.relu(net.layer_reduce_bn(net.layer_reduce(x)))
    b, c, m = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    feats = x.reshape(b, c, m)
    centring = (torch.eye(m, dtype=x.dtype) - torch.full((m, m), 1.0 / m, dtype=x.dtype)) / m
    cov = feats @ centring @ feats.transpose(1, 2)
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1).view(b, 1, 1)
    eye = torch.eye(c, dtype=x.dtype).expand(b, c, c)
    y, z = cov / trace, eye
    for _ in range(iters):  # coupled Newton-Schulz; the last step's Z is unused
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    y = y * trace.sqrt()
    rows, cols = torch.triu_indices(c, c)  # upper triangle, row by row
    return net.fc(y[:, rows, cols])
