"""frame2d: a small 2D CNN applied to each frame of a view, for representations learned from scratch on a CPU.

Input: normalized float clips [N, 3, T, H, W]; every frame goes through the same 2D CNN and the per-frame
embeddings are max-pooled over time: [N, D]. Why this shape (benchmarks/README.md, "Representation stage"):
- What tells fouls apart is small and spatial (a raised leg, an arm on an opponent, a mark on a shirt), so the
  network keeps detail: 3x3 convolutions at full resolution, each followed by 2x2 max-pooling (the strongest
  local response survives; a strided stem or early average pooling would alias or blur a few-pixel structure
  away), at the clip's native frame size (frame_size 0).
- The embedding is the spatial max and the spatial mean of the last block (D = 2 x 4 x width): the max answers
  "is the pattern anywhere in the frame", wherever the foul happens; the mean keeps the overall scene.
- The max over time lets a few frames around the event carry the class while the others are ignored.
- BatchNorm and channels-last memory make it train from scratch at a high learning rate, ~2x faster on CPU.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Frame2D(nn.Module):
    """Per-frame 2D CNN with spatial max+mean pooling and a max over frames: [N, 3, T, H, W] -> [N, 8 * width]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w // 2), nn.MaxPool2d(2), _block(w // 2, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
            _block(4 * w, 4 * w),
        )
        self.out_dim = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.to(memory_format=torch.channels_last)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of frames [M, 3, H, W] -> [M, D]."""
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        per_frame = self.frames(x.transpose(1, 2).reshape(n * t, c, h, w))
        return per_frame.view(n, t, -1).amax(dim=1)
