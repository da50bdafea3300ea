"""Helpers both kernel sets share: layouts, TF ``SAME`` padding, the plain convolution."""

from __future__ import annotations

import jax

DN = ("NHWC", "HWIO", "NHWC")  # activations NHWC, kernels HWIO


def same_pads(k: int) -> tuple[int, int]:
  """TF "SAME" padding of a stride-1 window of size k: total k-1, the extra
  pixel (even k) at the end."""
  return ((k - 1) // 2, k - 1 - (k - 1) // 2)


def plain_conv(x_NHWC, w_HWIO, stride: int = 1):
  """SAME convolution by ``lax.conv_general_dilated`` (no bias)."""
  return jax.lax.conv_general_dilated(
      x_NHWC, w_HWIO, (stride, stride), "SAME", dimension_numbers=DN)
