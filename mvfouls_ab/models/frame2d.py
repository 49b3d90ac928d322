"""frame2d: a small 2D CNN applied to each frame of a view, for representations learned from scratch on a CPU.

Input: normalized float clips [N, 3, T, H, W]; every frame goes through the same 2D CNN and the per-frame
embeddings are max-pooled over time: [N, D]. Why this shape (measured; README.md, "Results"):
- What tells fouls apart is small and spatial (a raised leg, an arm on an opponent, a mark on a shirt), so the
  network keeps detail: 3x3 convolutions at the clip's native frame size (frame_size 0), each followed by a ReLU and
  2x2 max-pooling (the strongest local response survives; a strided stem or early average pooling would alias or
  blur a few-pixel structure away).
- The embedding is the spatial max of the last block (D = 4 x width): "is the pattern anywhere in the frame",
  wherever the foul happens. Averages over the frame describe the scene (pitch, kits, camera), which a model
  trained on a few hundred actions then memorises instead of the foul.
- No normalization layers: with BatchNorm the same network fitted Train as fast but generalised worse on held-out
  actions (README.md, "Results"), and with none, embedding a clip does not depend on what else is in the batch.
- The max over time lets the frame that shows the foul carry the class while the others are ignored.
"""
from __future__ import annotations

import torch
from torch import nn


class Frame2D(nn.Module):
    """Per-frame 2D CNN (conv-ReLU-maxpool x3) with a spatial max and a max over frames: [N, 3, T, H, W] -> [N, 4w]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.out_dim = 4 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.to(memory_format=torch.channels_last)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of frames [M, 3, H, W] -> [M, D]."""
        return self.features(x.contiguous(memory_format=torch.channels_last)).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        per_frame = self.frames(x.transpose(1, 2).reshape(n * t, c, h, w))
        return per_frame.view(n, t, -1).amax(dim=1)
