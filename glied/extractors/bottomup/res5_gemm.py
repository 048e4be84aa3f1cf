"""res5 of the RoI head as matrix products over all RoIs of a chunk: the fast float32 CPU path.

The RoI head runs res5 (3 bottlenecks, 1024 -> 2048 channels, stride 1, 3x3 convs dilated by 2) on every
14x14 pooled map: nine tenths of the detector's ~1,930 GFLOP per image. Here every 1x1 convolution is one
GEMM over the rows of all RoIs of the chunk (``(k * P * P, C_in) @ (C_in, C_out)``, channels-last rows, BLAS
sgemm), with the FrozenBN folded into the weights and the bias; the residual is added by the same GEMM (it is
the ``C`` of ``C + A @ B``); ReLUs run in place. Only the dilated 3x3 convolution stays a convolution (oneDNN;
in NCHW by default, its fastest layout on the CPUs measured, at the cost of two copies of its input/output).

Same maths as ``backbone.make_res5`` + FrozenBN, in another summation order: outputs differ from the port's by
float32 rounding (about 1e-7 relative on the features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def folded(conv_norm) -> tuple:
    """(weight, bias) of a ConvNorm with its FrozenBN (or BatchNorm's running statistics, as in eval mode)
    folded in (float64 maths, stored in the conv's dtype); a ConvNorm already folded (conv bias, norm Identity)
    is read as is."""
    from glied.extractors.bottomup.backbone import FrozenBatchNorm2d

    conv, n = conv_norm.conv, conv_norm.norm
    w = conv.weight.detach()
    if isinstance(n, (FrozenBatchNorm2d, nn.BatchNorm2d)):
        s = n.weight.double() / torch.sqrt(n.running_var.double() + n.eps)
        b = n.bias.double() - n.running_mean.double() * s
        if conv.bias is not None:
            b = b + conv.bias.double() * s
        return (w.double() * s.view(-1, 1, 1, 1)).to(w.dtype), b.to(w.dtype)
    if not isinstance(n, nn.Identity):
        raise TypeError(f"GemmRes5 folds FrozenBN and BatchNorm only, not {type(n).__name__}")
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w, b


class GemmRes5(nn.Module):
    """Inference-only res5: pooled maps (k, C4, P, P) float32 -> region features (k, D) = mean over P x P.

    Built from the RoI head's res5 (``nn.Sequential`` of ``Bottleneck``; FrozenBN or already folded).
    Parameters are buffers: ``w1``/``w3``/``wsc`` stored transposed (C_in, C_out) for ``addmm``, ``w2`` as a
    channels-last conv weight.
    """

    def __init__(self, res5: nn.Sequential, nchw_3x3: bool = True):
        super().__init__()
        self.nchw_3x3 = nchw_3x3      # the dilated 3x3 in NCHW (oneDNN's fastest for it here) or channels-last
        self.blocks = []
        for i, blk in enumerate(res5):
            if blk.conv1.conv.kernel_size != (1, 1) or blk.conv1.conv.stride != (1, 1) or \
                    blk.conv2.conv.stride != (1, 1) or blk.conv3.conv.kernel_size != (1, 1):
                raise ValueError("GemmRes5 needs stride-1 bottlenecks with 1x1 first and last convolutions")
            w1, b1 = folded(blk.conv1)
            w2, b2 = folded(blk.conv2)
            w3, b3 = folded(blk.conv3)
            names = {"w1": w1[:, :, 0, 0].t().contiguous(), "b1": b1,
                     "w2": w2.contiguous(memory_format=torch.contiguous_format if nchw_3x3
                                         else torch.channels_last), "b2": b2,
                     "w3": w3[:, :, 0, 0].t().contiguous(), "b3": b3}
            if blk.shortcut is not None:
                ws, bs = folded(blk.shortcut)
                names.update(wsc=ws[:, :, 0, 0].t().contiguous(), bsc=(bs + b3))   # conv3's bias rides along
            for k, v in names.items():
                self.register_buffer(f"{k}_{i}", v.detach().clone(), persistent=False)
            self.blocks.append((i, blk.shortcut is not None, blk.conv2.conv.padding, blk.conv2.conv.dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, c, h, w = x.shape
        a = x.permute(0, 2, 3, 1).reshape(k * h * w, c)                      # (M, C) rows, M = k * h * w
        for i, proj, pad, dil in self.blocks:
            g = lambda n: getattr(self, f"{n}_{i}")                           # noqa: E731
            y = torch.addmm(g("b1"), a, g("w1")).relu_()                     # (M, mid)
            mid = y.shape[1]
            y4 = y.view(k, h, w, mid).permute(0, 3, 1, 2)                    # (k, mid, h, w) channels-last view
            if self.nchw_3x3:
                y4 = y4.contiguous()                                          # (k, mid, h, w) NCHW copy
            y = F.conv2d(y4, g("w2"), g("b2"), padding=pad, dilation=dil).relu_()
            y = y.permute(0, 2, 3, 1).reshape(k * h * w, mid)                # (M, mid); no copy when channels-last
            sc = torch.addmm(g("bsc"), a, g("wsc")) if proj else a + g("b3")  # (M, D): shortcut + conv3 bias
            a = sc.addmm_(y, g("w3")).relu_()                                # residual as the GEMM's C
        return a.view(k, h * w, -1).mean(dim=1)                               # (k, D)
