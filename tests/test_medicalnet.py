"""MedicalNet import: identical outputs to a MedicalNet-layout PyTorch net."""
from functools import partial

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from radnet_jax.models.medicalnet import load_medicalnet  # noqa: E402


# ---- Reference: Tencent MedicalNet models/resnet.py, width made a parameter.
def conv3x3x3(in_planes, out_planes, stride=1, dilation=1):
  return nn.Conv3d(in_planes, out_planes, kernel_size=3, dilation=dilation,
                   stride=stride, padding=dilation, bias=False)


def downsample_basic_block(x, planes, stride):
  out = F.avg_pool3d(x, kernel_size=1, stride=stride)
  zero_pads = torch.zeros(out.size(0), planes - out.size(1), out.size(2),
                          out.size(3), out.size(4))
  return torch.cat([out, zero_pads], dim=1)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
    self.bn1 = nn.BatchNorm3d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
    self.bn2 = nn.BatchNorm3d(planes)
    self.downsample = downsample

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    return self.relu(out + residual)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm3d(planes)
    self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride,
                           dilation=dilation, padding=dilation, bias=False)
    self.bn2 = nn.BatchNorm3d(planes)
    self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm3d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    return self.relu(out + residual)


class MedicalNetResNet(nn.Module):

  def __init__(self, block, layers, shortcut_type="B", width=64,
               num_seg_classes=2):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv3d(1, width, kernel_size=7, stride=(2, 2, 2),
                           padding=(3, 3, 3), bias=False)
    self.bn1 = nn.BatchNorm3d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 3), stride=2, padding=1)
    self.layer1 = self._make_layer(block, width, layers[0], shortcut_type)
    self.layer2 = self._make_layer(block, width * 2, layers[1], shortcut_type,
                                   stride=2)
    self.layer3 = self._make_layer(block, width * 4, layers[2], shortcut_type,
                                   stride=1, dilation=2)
    self.layer4 = self._make_layer(block, width * 8, layers[3], shortcut_type,
                                   stride=1, dilation=4)
    self.conv_seg = nn.Sequential(
        nn.ConvTranspose3d(width * 8 * block.expansion, 32, 2, stride=2),
        nn.BatchNorm3d(32), nn.ReLU(inplace=True),
        nn.Conv3d(32, 32, kernel_size=3, stride=(1, 1, 1), padding=(1, 1, 1),
                  bias=False),
        nn.BatchNorm3d(32), nn.ReLU(inplace=True),
        nn.Conv3d(32, num_seg_classes, kernel_size=1, stride=(1, 1, 1),
                  bias=False))

  def _make_layer(self, block, planes, blocks, shortcut_type, stride=1,
                  dilation=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      if shortcut_type == "A":
        downsample = partial(downsample_basic_block,
                             planes=planes * block.expansion, stride=stride)
      else:
        downsample = nn.Sequential(
            nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1,
                      stride=stride, bias=False),
            nn.BatchNorm3d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride=stride, dilation=dilation,
                    downsample=downsample)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes, dilation=dilation))
    return nn.Sequential(*layers)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


CASES = [(10, BasicBlock, (1, 1, 1, 1), "A", 8),
         (18, BasicBlock, (2, 2, 2, 2), "B", 4),
         (50, Bottleneck, (3, 4, 6, 3), "B", 2)]


@pytest.mark.parametrize("depth,block,layers,shortcut,width", CASES)
def test_identical_outputs(depth, block, layers, shortcut, width):
  torch.manual_seed(depth)
  ref = MedicalNetResNet(block, layers, shortcut, width)
  with torch.no_grad():  # Non-trivial BatchNorm statistics and affine terms.
    for m in ref.modules():
      if isinstance(m, nn.BatchNorm3d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  ref.eval()
  x = torch.randn(2, 1, 16, 20, 12)
  with torch.no_grad():
    want = ref.features(x).permute(0, 2, 3, 4, 1).numpy()

  # Saved through DataParallel: every key prefixed with "module.".
  sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
  model, variables, report = load_medicalnet(sd, depth, num_filters=width)
  assert report.shortcut_type == shortcut
  left = dict(report.left_out)
  assert all(k.startswith("conv_seg.") or k.endswith("num_batches_tracked")
             for k in left)
  assert any(k.startswith("conv_seg.") for k in left)
  n_trunk = sum(1 for k in sd if not k.startswith("module.conv_seg.")
                and not k.endswith("num_batches_tracked"))
  assert len(report.mapped) == n_trunk
  assert "left out conv_seg.0.weight" in report.summary()

  xj = x.permute(0, 2, 3, 4, 1).numpy()
  _, feats = jax.jit(lambda v, x: model.apply(v, x, False))(variables, xj)
  assert feats[-1].shape == want.shape
  np.testing.assert_allclose(np.asarray(feats[-1]), want, rtol=1e-4,
                             atol=1e-4)


def test_errors():
  with pytest.raises(ValueError, match="depth"):
    load_medicalnet({}, 12)
  with pytest.raises(ValueError, match="conv1.weight"):
    load_medicalnet({"fc.weight": np.zeros((2, 2))}, 18)
  ref = MedicalNetResNet(BasicBlock, (1, 1, 1, 1), "B", 4)
  with pytest.raises(ValueError, match="has shape"):
    load_medicalnet(ref.state_dict(), 10, num_filters=8)
