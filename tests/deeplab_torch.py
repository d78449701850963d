"""A PyTorch DeepLabV3 (± RankSeg) written from rankseg-spec.md §8 and the fixtures README, with
mmseg's module names, for the export round trip in tests/test_deeplab.py (eval forward only).

Imported by tests only when torch is installed (the caller skips otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, padding=0, dilation=1, groups=1, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, padding, dilation, groups, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.norm, self.act = norm, act

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.bn(x)
        return F.relu(x) if self.act else x


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetV1c(nn.Module):
    def __init__(self, depth, stem, base, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)):
        super().__init__()
        half = stem // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
        )  # fmt: skip
        cin = stem
        for i, n in enumerate(DEPTHS[depth]):
            planes, blocks = base * 2**i, []
            for j in range(n):
                d = dilations[i]
                d = d // 2 if j == 0 and d > 1 else d  # contract_dilation
                stride = strides[i] if j == 0 else 1
                down = j == 0 and (stride != 1 or cin != 4 * planes)
                blocks.append(Bottleneck(cin, planes, stride, d, down))
                cin = 4 * planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2, 1)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        out = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, d_ff):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, d_ff)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GroupWiseLinear(nn.Module):
    def __init__(self, n_cls, dim):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(1, n_cls, dim))
        self.b = nn.Parameter(torch.zeros(1, n_cls))

    def forward(self, x):
        return (self.W * x).sum(-1) + self.b


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 1, groups=cin, norm=False)
        self.pointwise_conv = ConvModule(cin, cout, 1, norm=False)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class RankSegEncoderHead(nn.Module):
    def __init__(self, n_cls, d_encoder, hidden, heads, d_ff, downsample):
        super().__init__()
        self.block = Block(hidden, heads, d_ff)
        self.norm = nn.LayerNorm(hidden)
        self.fc = GroupWiseLinear(n_cls, hidden)
        self.proj_dec = DepthwiseSeparable(d_encoder, hidden)
        self.n_cls, self.downsample = n_cls, downsample

    def forward(self, x, cls_emb):
        x = self.proj_dec(F.adaptive_avg_pool2d(x, self.downsample))
        x = x.flatten(2).transpose(1, 2)
        x = self.block(torch.cat([x, cls_emb.expand(x.shape[0], -1, -1)], 1))
        return self.fc(self.norm(x[:, -self.n_cls :]))


class ASPPHead(nn.Module):
    def __init__(self, cin, ch, n_cls, dilations, rankseg=None):
        super().__init__()
        if rankseg is None:
            self.conv_seg = nn.Conv2d(ch, n_cls, 1)
        else:
            self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, ch))
            self.cls_bias_emb = nn.Parameter(torch.zeros(1, n_cls))
            self.img_cls_head = RankSegEncoderHead(n_cls, cin, ch, *rankseg)
            self.norm = nn.LayerNorm(50)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, ch, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, ch, 1 if d == 1 else 3, 0 if d == 1 else d, d) for d in dilations
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * ch, ch, 3, 1)
        self.n_cls, self.rankseg = n_cls, rankseg

    def forward(self, x):
        pool = F.interpolate(self.image_pool(x), x.shape[2:], mode="bilinear")
        feat = self.bottleneck(torch.cat([pool] + [m(x) for m in self.aspp_modules], 1))
        if self.rankseg is None:
            return self.conv_seg(feat)
        img = self.img_cls_head(x, self.cls_emb[0])
        topk = img.argsort(1, descending=True)[:, :50]
        emb, bias = self.cls_emb[0][topk], self.cls_bias_emb[0][topk]
        out = torch.einsum("bchw,bkc->bkhw", feat, emb) + bias[..., None, None]
        out = self.norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        full = out.new_full((x.shape[0], self.n_cls, *x.shape[2:]), -100.0)
        return full.scatter(1, topk[..., None, None].expand(-1, -1, *x.shape[2:]), out)


class FCNHead(nn.Module):
    def __init__(self, cin, ch, n_cls):
        super().__init__()
        self.conv_seg = nn.Conv2d(ch, n_cls, 1)
        self.convs = nn.Sequential(ConvModule(cin, ch, 3, 1))


class DeepLabV3(nn.Module):
    """The fixtures' small model: ResNetV1c-50 stem 8 base 4, ASPP 16 ch, aux 8 ch."""

    def __init__(self, n_cls=171, rankseg=True):
        super().__init__()
        self.backbone = ResNetV1c(50, 8, 4)
        extra = (2, 32, 16) if rankseg else None  # heads, d_ff, downsample
        self.decode_head = ASPPHead(128, 16, n_cls, (1, 12, 24, 36), extra)
        self.auxiliary_head = FCNHead(64, 8, n_cls)

    def forward(self, images):
        logits = self.decode_head(self.backbone(images)[3])
        return F.interpolate(logits, images.shape[2:], mode="bilinear")
