"""KV-CAR's autoencoders: one per (layer, KV head) for keys and one for values, stacked per layer.

A layer's autoencoder is block-diagonal over its KV heads: head ``h``'s vector (``head_dim`` wide) goes
through its own ``Linear(d, hidden) -> BatchNorm -> LeakyReLU -> Linear(hidden, latent)``; the decoder
mirrors it (``Linear(latent, hidden) -> BatchNorm -> LeakyReLU -> Linear(hidden, d)``). The heads of a
layer are computed together as batched matmuls (``[H, N, d] @ [H, d, hidden]``), so decoding every token a
layer holds is two ``baddbmm`` calls, not a loop over tokens.

``HeadAutoencoder`` is the trainable form (BatchNorm with batch statistics in training, running statistics
in eval); ``fold`` turns it into ``FoldedAutoencoder``, plain tensors with BatchNorm folded into the linear
layer before it (inference does no normalisation at all).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.01  # LeakyReLU negative slope (PyTorch's default; the paper does not give one)
EPS = 1e-5


class StackedLinear(nn.Module):
    """``heads`` independent ``Linear(n_in, n_out)``: x [H, N, n_in] -> [H, N, n_out]."""

    def __init__(self, heads: int, n_in: int, n_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(heads, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)


class StackedBatchNorm(nn.Module):
    """BatchNorm1d per head over the tokens of the batch: x [H, N, C]."""

    def __init__(self, heads: int, channels: int, momentum: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, channels))
        self.bias = nn.Parameter(torch.zeros(heads, channels))
        self.register_buffer("running_mean", torch.zeros(heads, channels))
        self.register_buffer("running_var", torch.ones(heads, channels))
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=1)
            var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                n = x.shape[1]
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + EPS)
        return (x - mean[:, None, :]) * scale[:, None, :] + self.bias[:, None, :]

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BatchNorm as ``x * scale + shift`` (per head and channel)."""
        scale = self.weight * torch.rsqrt(self.running_var + EPS)
        return scale, self.bias - self.running_mean * scale


class HeadAutoencoder(nn.Module):
    """The autoencoders of one layer's heads, for keys or for values (trainable form)."""

    def __init__(self, heads: int, dim: int, hidden: int, latent: int):
        super().__init__()
        self.heads, self.dim, self.hidden, self.latent = heads, dim, hidden, latent
        self.enc1, self.enc_bn, self.enc2 = StackedLinear(heads, dim, hidden), StackedBatchNorm(heads, hidden), \
            StackedLinear(heads, hidden, latent)
        self.dec1, self.dec_bn, self.dec2 = StackedLinear(heads, latent, hidden), StackedBatchNorm(heads, hidden), \
            StackedLinear(heads, hidden, dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc2(F.leaky_relu(self.enc_bn(self.enc1(x)), SLOPE))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec2(F.leaky_relu(self.dec_bn(self.dec1(z)), SLOPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def fold(self, dtype=None) -> "FoldedAutoencoder":
        """Inference form: each BatchNorm (running statistics) folded into the linear layer before it."""
        def folded(linear: StackedLinear, bn: StackedBatchNorm):
            scale, shift = bn.affine()
            return linear.weight * scale[:, None, :], linear.bias * scale + shift

        w1, b1 = folded(self.enc1, self.enc_bn)
        w3, b3 = folded(self.dec1, self.dec_bn)
        tensors = [w1, b1, self.enc2.weight, self.enc2.bias, w3, b3, self.dec2.weight, self.dec2.bias]
        return FoldedAutoencoder(*[t.detach().to(dtype or t.dtype).contiguous() for t in tensors])


class FoldedAutoencoder:
    """Encoder and decoder of one layer's heads as plain tensors (no BatchNorm left).

    Weights are ``[H, n_in, n_out]``, biases ``[H, n_out]``. ``heads`` (an index tensor) selects some heads:
    the tokens of head ``heads[i]`` are row ``i`` of the input."""

    def __init__(self, w1, b1, w2, b2, w3, b3, w4, b4):
        self.w1, self.b1, self.w2, self.b2 = w1, b1[:, None, :], w2, b2[:, None, :]
        self.w3, self.b3, self.w4, self.b4 = w3, b3[:, None, :], w4, b4[:, None, :]

    @staticmethod
    def _pick(w: torch.Tensor, heads):
        return w if heads is None else w[heads]

    def encode(self, x: torch.Tensor, heads=None) -> torch.Tensor:
        h = torch.baddbmm(self._pick(self.b1, heads), x.to(self.w1.dtype), self._pick(self.w1, heads))
        return torch.baddbmm(self._pick(self.b2, heads), F.leaky_relu(h, SLOPE), self._pick(self.w2, heads))

    def decode(self, z: torch.Tensor, heads=None) -> torch.Tensor:
        h = torch.baddbmm(self._pick(self.b3, heads), z.to(self.w3.dtype), self._pick(self.w3, heads))
        return torch.baddbmm(self._pick(self.b4, heads), F.leaky_relu(h, SLOPE), self._pick(self.w4, heads))

    def decoder(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder's ``w3 [H, latent, hidden], b3 [H, hidden], w4 [H, hidden, d], b4 [H, d]``."""
        return self.w3, self.b3[:, 0], self.w4, self.b4[:, 0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3, self.w4, self.b4))


class LayerCodec(nn.Module):
    """A layer's key and value autoencoders (values may have their own widths)."""

    def __init__(self, heads: int, dim: int, hidden: int, latent: int, hidden_v: int | None = None,
                 latent_v: int | None = None):
        super().__init__()
        self.k = HeadAutoencoder(heads, dim, hidden, latent)
        self.v = HeadAutoencoder(heads, dim, hidden_v or hidden, latent_v or latent)


@torch.no_grad()
def make_identity(ae: HeadAutoencoder) -> HeadAutoencoder:
    """Set an autoencoder with ``latent == dim`` and ``hidden == 2 * dim`` to the exact identity: the
    hidden layer carries ``[x, -x]``, and ``leaky(x) - leaky(-x) = (1 + slope) x`` undoes the activation;
    BatchNorm is the identity (mean 0, variance 1 - eps). For tests: a codec that must reproduce full."""
    d = ae.dim
    if ae.latent != d or ae.hidden != 2 * d:
        raise ValueError(f"an identity autoencoder needs latent = dim = {d} and hidden = {2 * d}")
    eye = torch.eye(d)
    up, down = torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0) / (1 + SLOPE)
    for first, bn, second in ((ae.enc1, ae.enc_bn, ae.enc2), (ae.dec1, ae.dec_bn, ae.dec2)):
        first.weight.copy_(up.expand_as(first.weight))
        second.weight.copy_(down.expand_as(second.weight))
        first.bias.zero_()
        second.bias.zero_()
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - EPS)
    return ae


@torch.no_grad()
def pca_init_(ae: HeadAutoencoder, x: torch.Tensor) -> HeadAutoencoder:
    """Start an autoencoder with ``hidden == 2 * latent`` at the best affine code of ``x [H, N, d]`` (its
    principal components): the latent is ``P^T (x - mean)``, the output ``P z + mean``. The hidden layers
    carry ``[z, -z]`` (the LeakyReLU is undone as in ``make_identity``) and BatchNorm's scale is the hidden
    unit's standard deviation on ``x``, so it starts (nearly) as the identity on such data in both modes."""
    r = ae.latent
    if ae.hidden != 2 * r:
        raise ValueError(f"a PCA start needs hidden = 2 * latent = {2 * r}, got {ae.hidden}")
    x = x.float()
    mean = x.mean(dim=1)  # [H, d]
    basis = torch.linalg.svd(x - mean[:, None], full_matrices=False).Vh[:, :r].transpose(1, 2)  # [H, d, r]
    eye = torch.eye(r, device=x.device).expand(ae.heads, r, r)
    split = torch.cat([eye, -eye], dim=2)  # z -> [z, -z]
    merge = torch.cat([eye, -eye], dim=1) / (1 + SLOPE)  # leaky([z, -z]) -> z
    shift = torch.einsum("hd,hdr->hr", mean, basis)
    ae.enc1.weight.copy_(torch.cat([basis, -basis], dim=2))
    ae.enc1.bias.copy_(torch.cat([-shift, shift], dim=1))
    ae.enc2.weight.copy_(merge)
    ae.enc2.bias.zero_()
    ae.dec1.weight.copy_(split)
    ae.dec1.bias.zero_()
    ae.dec2.weight.copy_(torch.cat([basis, -basis], dim=2).transpose(1, 2) / (1 + SLOPE))
    ae.dec2.bias.copy_(mean)
    z = torch.baddbmm(ae.enc1.bias[:, None], x, ae.enc1.weight)  # the encoder's hidden units, [z, -z]
    for bn in (ae.enc_bn, ae.dec_bn):
        bn.running_mean.copy_(z.mean(dim=1))
        bn.running_var.copy_(z.var(dim=1))
        bn.weight.copy_(torch.sqrt(bn.running_var + EPS))
        bn.bias.copy_(bn.running_mean)
    return ae
