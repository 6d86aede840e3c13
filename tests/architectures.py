"""Architectures beyond VGG/ResNet, built from ``torch.nn`` (seeded), and MTCNN's ONet with the
pretrained weights that ``facenet-pytorch`` ships."""

from __future__ import annotations

import torch
from torch import nn

from .zoo import package_file


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act() if act else nn.Identity())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, depthwise 3×3, 1×1 project, residual when shapes match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   conv_bn(hidden, cout, 1, act=None))

    def forward(self, x):
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 3, 2), InvertedResidual(16, 16, 1, 1),
                                      InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
                                      conv_bn(24, 64, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, gate=nn.Hardsigmoid, act=nn.ReLU):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // 4, 1), act(),
                                nn.Conv2d(channels // 4, channels, 1), gate())

    def forward(self, x):
        return x * self.fc(x)


class MobileNetV3ish(nn.Module):
    """HardSwish activations and HardSigmoid squeeze-excitation gates."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.Hardswish),
                                      conv_bn(16, 16, 3, 1, groups=16, act=nn.Hardswish), SqueezeExcite(16),
                                      conv_bn(16, 32, 1, act=nn.Hardswish), conv_bn(32, 32, 3, 2, groups=32,
                                                                                    act=nn.Hardswish),
                                      SqueezeExcite(32), conv_bn(32, 48, 1, act=nn.Hardswish))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SiLUByHand(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class EfficientNetish(nn.Module):
    """MBConv blocks with SiLU written as x·sigmoid(x) and sigmoid squeeze-excitation."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=SiLUByHand)
        self.block = nn.Sequential(conv_bn(16, 64, 1, act=SiLUByHand), conv_bn(64, 64, 3, 1, groups=64,
                                                                                act=SiLUByHand),
                                   SqueezeExcite(64, gate=nn.Sigmoid, act=SiLUByHand), conv_bn(64, 16, 1, act=None))
        self.head = conv_bn(16, 64, 1, act=SiLUByHand)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.fc(self.head(x).mean((2, 3)))


class DenseNetish(nn.Module):
    """Dense blocks (BN-ReLU-Conv, Concat), a transition with average pooling."""

    def __init__(self, classes=10, growth=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layers = nn.ModuleList()
        channels = 16
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                             nn.Conv2d(channels, growth, 3, 1, 1, bias=False)))
            channels += growth
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 16, 1),
                                        nn.AvgPool2d(2))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(self.transition(x).mean((2, 3)))


class Inceptionish(nn.Module):
    """Parallel 1×1 / 3×3 / 5×5 / pool branches concatenated, twice."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.modules_ = nn.ModuleList([self._inception(16), self._inception(32)])
        self.fc = nn.Linear(32, classes)

    @staticmethod
    def _inception(cin):
        return nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 5, padding=2), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 8, 1), nn.ReLU())])

    def forward(self, x):
        x = self.stem(x)
        for branches in self.modules_:
            x = torch.cat([branch(x) for branch in branches], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ShuffleBlock(nn.Module):
    def __init__(self, channels, groups=2):
        super().__init__()
        self.groups = groups
        self.conv1 = conv_bn(channels, channels, 1, groups=groups, act=nn.ReLU)
        self.dw = conv_bn(channels, channels, 3, groups=channels, act=None)
        self.conv2 = conv_bn(channels, channels, 1, groups=groups, act=None)

    def forward(self, x):
        out = self.conv1(x)
        n, c, h, w = out.shape
        out = out.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.relu(x + self.conv2(self.dw(out)))


class ShuffleNetish(nn.Module):
    """Grouped 1×1 convs with a channel shuffle (Reshape → Transpose → Reshape)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.ReLU)
        self.blocks = nn.Sequential(ShuffleBlock(16), ShuffleBlock(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class WithPreprocessing(nn.Module):
    """uint8 HWC image in; Cast, scale, mean/std normalisation and BatchNorm written out as
    Sub/Mul/Add inside the graph, before a small conv net."""

    def __init__(self, classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 16, 3, 1, 1)
        self.register_buffer("bn_shift", torch.randn(1, 16, 1, 1) * 0.1)
        self.register_buffer("bn_scale", 1 + torch.randn(1, 16, 1, 1) * 0.1)
        self.conv2 = nn.Conv2d(16, 16, 3, 2, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, image):
        x = image.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        x = torch.relu((self.conv(x) - self.bn_shift) * self.bn_scale + 0.1)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class ONet(nn.Module):
    """MTCNN's output network, as ``facenet_pytorch.models.mtcnn.ONet`` defines it (PReLU,
    ceil-mode max pools, a permute before the dense layers); outputs (box, landmarks, face prob)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2, self.dense6_3 = nn.Linear(256, 4), nn.Linear(256, 10)
        if pretrained:
            self.load_state_dict(torch.load(package_file("facenet_pytorch", "data/onet.pt"), weights_only=True))

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))
