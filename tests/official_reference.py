"""Test oracle: the forward pass of the RELEASED GSoP-Net code (and of fast-MPN-COV's iSQRT-COV ResNet, at the
end), rewritten from scratch.

Source of truth: github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks
(``torchvision/models/resnet.py``, ``torchvision/models/MPNCOV/python/MPNCOV.py``, ``main.py``).

This module is written for checking, not for speed. Its only promises are

* ``state_dict()`` keys and shapes are exactly those of the released ``ResNet`` (so a checkpoint written
  from it is indistinguishable, key- and shape-wise, from one written by the released ``main.py``), and
* its eval-mode forward computes what the released forward computes, in whatever dtype the module is
  in (the released code hard-codes float32 buffers in places; here every helper follows the input dtype
  so the oracle can run in float64).

Deliberate differences from the released code, none of which changes an eval-mode output:

* GSoP-Net1 pools with a mean over H and W instead of ``AvgPool2d(14)`` (identical at 224x224, and it
  lets the tests use small inputs);
* no custom autograd Functions (plain autograd gives the same forward);
* no prints, no ``.cuda()``, no ``is`` comparisons of strings.

Nothing here imports ``timm_gsop``: the oracle must stay independent of the code under test.
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = [
    'MANNER_TO_CODE', 'STAGE_DEPTHS', 'released_attention_layout', 'released_channel_covariance',
    'released_position_covariance', 'released_sqrtm', 'released_triu_vector', 'OfficialBottleneck',
    'OfficialGSoPResNet', 'build_official', 'randomize_', 'released_triu_index', 'MPNCOV_CHILDREN', 'mpncov_resnet',
    'mpncov_forward',
]

# main.py's --att_manner -> the one-character code the released Bottleneck switches on
MANNER_TO_CODE = {
    'channel': '1',
    'position': '2',
    'fusion_avg': '+',
    'fusion_max': 'M',
    'fusion_concat': '&',
}
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
    """MPNCOV ``Covpool`` forward: ``X I_hat X^T`` with the explicit ``M x M`` centring matrix.

    ``x``: (B, C, H, W) -> (B, C, C), ``M = H * W``,
    ``I_hat = (1/M) I_M - (1/M^2) 1 1^T``.
    """
    batch, channels, height, width = x.shape
    positions = height * width
    feats = x.reshape(batch, channels, positions)
    centring = (torch.eye(positions, dtype=x.dtype, device=x.device) / positions
                - torch.ones(positions, positions, dtype=x.dtype, device=x.device) / (positions * positions))
    centring = centring.expand(batch, positions, positions)
    return feats.bmm(centring).bmm(feats.transpose(1, 2))


def released_position_covariance(x: torch.Tensor) -> torch.Tensor:
    """resnet.py ``cov_feature``: ``X^T I_hat X`` where ``I_hat`` is ``C x C`` but is scaled by the number
    of POSITIONS ``M``: ``I_hat = (1/M) I_C - (1/M^2) 1 1^T``.

    ``x``: (B, C, H, W) -> (B, M, M). Not a covariance unless C == M; kept as released.
    """
    batch, channels, height, width = x.shape
    positions = height * width
    feats = x.reshape(batch, channels, positions)
    centring = (torch.eye(channels, dtype=x.dtype, device=x.device) / positions
                - torch.ones(channels, channels, dtype=x.dtype, device=x.device) / (positions * positions))
    centring = centring.expand(batch, channels, channels)
    return feats.transpose(1, 2).bmm(centring).bmm(feats)


def released_sqrtm(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """MPNCOV ``Sqrtm`` forward, step for step (coupled Newton-Schulz with trace pre-normalisation and
    sqrt(trace) post-compensation). For ``iterations < 2`` it returns, like the release, the first
    ``0.5 (3I - A)`` factor times sqrt(trace) (only 3 and 5 are used in practice).
    """
    batch, dim, _ = x.shape
    three_eye = 3.0 * torch.eye(dim, dtype=x.dtype, device=x.device).expand(batch, dim, dim)
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
    major), i.e. the lower triangle with diagonal, read row by row. (B, d, d) -> (B, d (d + 1) / 2)."""
    batch, dim, _ = x.shape
    return x.reshape(batch, dim * dim)[:, released_triu_index(dim).to(x.device)]


def released_triu_index(dim: int) -> torch.Tensor:
    """``Triuvec``'s flat indices: the nonzeros of ``ones(d, d).triu().t()``, row major."""
    return torch.ones(dim, dim).triu().t().reshape(dim * dim).nonzero().reshape(-1)


# ---- network ----------------------------------------------------------------------------------------

class OfficialBottleneck(nn.Module):
    """The released ``Bottleneck`` (torchvision style: stride on conv2) with its attention slot.

    Parameterised submodules carry the released attribute names; parameter-free ops are functional.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 attention: str = NO_ATTENTION, att_dim: int = ATT_DIM) -> None:
        super().__init__()
        width = planes
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.attention = attention

        has_channel_branch = attention in ('1', '+', 'M', '&')
        has_position_branch = attention in ('2', '+', 'M', '&')

        if has_channel_branch:
            # released: "if planes > 64: DR_stride = 1 else: DR_stride = 2" (i.e. stage 1 only)
            reduce_stride = 1 if planes > 64 else 2
            self.conv_for_DR = nn.Conv2d(out_channels, att_dim, kernel_size=1, stride=reduce_stride, bias=True)
            self.bn_for_DR = nn.BatchNorm2d(att_dim)
            self.row_bn = nn.BatchNorm2d(att_dim)
            self.row_conv_group = nn.Conv2d(
                att_dim, ROW_EXPANSION * att_dim, kernel_size=(att_dim, 1), groups=att_dim, bias=True)
            self.fc_adapt_channels = nn.Conv2d(ROW_EXPANSION * att_dim, out_channels, kernel_size=1, bias=True)

        if has_position_branch:
            positions = POSITION_GRID * POSITION_GRID
            self.conv_for_DR_spatial = nn.Conv2d(out_channels, att_dim, kernel_size=1, stride=1, bias=True)
            self.bn_for_DR_spatial = nn.BatchNorm2d(att_dim)
            self.row_bn_for_spatial = nn.BatchNorm2d(positions)
            self.row_conv_group_for_spatial = nn.Conv2d(
                positions, ROW_EXPANSION * positions, kernel_size=(positions, 1), groups=positions, bias=True)
            self.fc_adapt_channels_for_spatial = nn.Conv2d(
                ROW_EXPANSION * positions, positions, kernel_size=1, bias=True)

        if attention == '&':
            # released arithmetic, kept literally (math.log(., 2), int truncation)
            groups = int(out_channels / 64)
            factor = int(math.log(32 / groups, 2))
            kernel = factor * 2 + 5
            pad = factor + 2
            for name in ('dilate_conv_for_concat1', 'dilate_conv_for_concat2'):
                setattr(self, name, nn.Conv2d(
                    out_channels, out_channels, kernel_size=(kernel, 1), stride=1, padding=(pad, 0),
                    groups=groups, bias=True))
            self.bn_for_concat = nn.BatchNorm2d(out_channels)

    # released chan_att: weights (B, C, 1, 1)
    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x)
        y = F.relu(self.bn_for_DR(self.conv_for_DR(y)))
        cov = released_channel_covariance(y)                 # (B, d, d)
        rows = cov.unsqueeze(-1)                             # (B, d, d, 1): row i is "channel" i
        q = self.row_conv_group(self.row_bn(rows))           # (B, 4d, 1, 1); no activation (released)
        return torch.sigmoid(self.fc_adapt_channels(q))

    # released pos_att: weights (B, 1, H, W)
    def position_weights(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x)
        y = self.bn_for_DR_spatial(self.conv_for_DR_spatial(y))      # no ReLU here (released)
        y = F.adaptive_avg_pool2d(y, (POSITION_GRID, POSITION_GRID))
        mat = released_position_covariance(y)                         # (B, 64, 64)
        q = F.relu(self.row_conv_group_for_spatial(self.row_bn_for_spatial(mat.unsqueeze(-1))))
        w = torch.sigmoid(self.fc_adapt_channels_for_spatial(q))      # (B, 64, 1, 1)
        w = w.reshape(w.shape[0], 1, POSITION_GRID, POSITION_GRID)
        return F.adaptive_avg_pool2d(w, (x.shape[2], x.shape[3]))    # "unpool" to H x W

    def apply_attention(self, x: torch.Tensor) -> torch.Tensor:
        code = self.attention
        if code == NO_ATTENTION:
            return x
        if code == '1':
            return x * self.channel_weights(x)
        if code == '2':
            return F.relu(x * self.position_weights(x))
        by_channel = x * self.channel_weights(x)
        by_position = F.relu(x * self.position_weights(x))
        if code == '+':
            return by_channel + by_position
        if code == 'M':
            return torch.max(by_channel, by_position)
        if code == '&':
            mixed = self.dilate_conv_for_concat1(by_channel) + self.dilate_conv_for_concat2(by_position)
            return self.bn_for_concat(mixed)
        raise ValueError(f'unknown attention code {code!r}')

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
            blocks = []
            for block_idx in range(depth):
                block_stride = stride if block_idx == 0 else 1
                downsample = None
                if block_idx == 0 and (block_stride != 1 or inplanes != planes * EXPANSION):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * EXPANSION, kernel_size=1, stride=block_stride, bias=False),
                        nn.BatchNorm2d(planes * EXPANSION),
                    )
                blocks.append(OfficialBottleneck(
                    inplanes, planes, block_stride, downsample, attention=codes[block_idx], att_dim=att_dim))
                inplanes = planes * EXPANSION
            setattr(self, f'layer{idx + 1}', nn.Sequential(*blocks))

        if gsop_mode == 1:
            self.fc = nn.Linear(inplanes, num_classes)
        else:
            self.layer_reduce = nn.Conv2d(inplanes, ISQRT_DIM, kernel_size=1, stride=1, padding=0, bias=False)
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
        x = F.relu(self.layer_reduce_bn(self.layer_reduce(x)))
        x = released_channel_covariance(x)
        x = released_sqrtm(x, ISQRT_ITERS)
        return released_triu_vector(x)

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
    """Fill every parameter and every BatchNorm buffer with seeded random values of a sane scale.

    * convs: kaiming-normal with fan_in (ReLU gain); conv biases ~ U(-0.2, 0.2);
    * BatchNorm: weight ~ U(0.5, 1.5), bias ~ U(-0.2, 0.2), num_batches_tracked a random count;
    * linear: N(0, 1 / fan_in) weights, biases ~ U(-0.1, 0.1);
    * BatchNorm running statistics: random stats (mean ~ N(0, 0.2^2), var ~ U(0.5, 2)) would not
      normalise anything, and a 16- or 33-block ResNet then grows its activations ~sqrt(2)x per block
      until every sigmoid gate saturates. So they are calibrated instead: one eval-mode pass over
      ``calibration_input`` (default: a seeded 8x3x64x64 standard-normal batch) in which every BN, just
      before it runs, sets ``running_mean = mean + 0.2 * std * N(0, 1)`` and
      ``running_var = var * U(0.5, 2)`` from the per-channel statistics of its actual input. Downstream
      layers calibrate on the already perturbed activations, so eval outputs stay O(1), while no BN
      is an exact batch normalisation;
    * the 1x1 convs that feed a sigmoid (``fc_adapt_channels``, ``fc_adapt_channels_for_spatial``) are
      rescaled in the same pass so that their outputs have standard deviation ``GATE_LOGIT_STD`` on the
      calibration batch: the gates then vary between samples, channels and positions instead of sitting
      at 0 or 1, so a wrong covariance, row order or branch wiring shows up in the output.

    Every value differs from PyTorch's defaults (BN weight 1, bias 0, mean 0, var 1), so a tensor that
    a loader silently leaves at its init changes the output. The model is left in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen).mul_(high - low).add_(low)

    def randn(shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen).mul_(std)

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
        x = args[0].double()
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False).clamp_min(1e-6)
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
        model.eval()
        model(calibration_input.to(device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return model


def official_state_dict_keys(model: nn.Module) -> Dict[str, tuple]:
    """Key -> shape of a model's state dict (debugging helper)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    b, c, h, w = x.shape
    m = h * w
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
