"""benchmarks/op_profile.py: the per-op profile attributes a convolution's three parts."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from s4jax.models import conv_ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
try:
  import op_profile  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
finally:
  sys.path.pop(0)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    conv = conv_ops.conv_general_dilated
    x = nn.relu(nn.Conv(16, (3, 3), conv_general_dilated=conv)(x))
    x = nn.Conv(16, (1, 1), conv_general_dilated=conv)(x)
    x = nn.Conv(8, (3, 3), strides=2, conv_general_dilated=conv)(x)
    return jnp.mean(x**2)


@pytest.mark.parametrize("mode", ["xla", "all"])
def test_profile_attributes_convolution_parts(mode, monkeypatch):
  monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, mode)  # read when the step is traced
  net = _Net()
  x = jnp.ones((2, 16, 16, 8))
  params = net.init(jax.random.key(0), x)
  compiled = jax.jit(jax.grad(lambda p, x: net.apply(p, x))).lower(params, x).compile()

  per_kind, per_op, ops = op_profile.profile(lambda: compiled(params, x), compiled.as_text(), 2)

  assert per_op and all(name in ops for name in per_op)
  assert sum(per_kind.values()) > 0
  assert {"conv forward", "conv input grad"} <= set(per_kind)
  if mode == "xla":
    assert "conv weight grad (XLA)" in per_kind
    assert "conv weight grad (products)" not in per_kind
  else:
    assert "conv weight grad (products)" in per_kind
    assert "conv weight grad (XLA)" not in per_kind
  kinds = {op["kind"] for op in ops.values()}
  assert "conv (unattributed)" not in kinds


def test_kernel_shaped_output_needs_a_program_parameter():
  hlo = """HloModule m
%fused (param_0: f32[3,3,8,16]) -> f32[3,3,8,16] {
  %param_0 = f32[3,3,8,16]{3,2,1,0} parameter(0)
}
ENTRY %main (x: f32[2,8,8,8]) -> f32[16,3,3,8] {
  %x = f32[2,8,8,8]{3,2,1,0} parameter(0)
  %convolution.1 = f32[16,3,3,8]{3,2,1,0} convolution(%x, %x), dim_labels=b01f_01io->b01f
}
"""
  # No [3,3,8,16] parameter of the program: the output is not a known kernel's gradient.
  assert op_profile.hlo_ops(hlo)["convolution.1"]["kind"] == "conv (unattributed)"
  with_kernel = hlo.replace(
    "  %x = f32[2,8,8,8]{3,2,1,0} parameter(0)\n",
    "  %x = f32[2,8,8,8]{3,2,1,0} parameter(0)\n  %k = f32[3,3,8,16]{3,2,1,0} parameter(1)\n",
  )
  assert op_profile.hlo_ops(with_kernel)["convolution.1"]["kind"] == "conv weight grad (XLA)"


def test_fusion_is_what_its_convolution_is():
  # XLA:CPU wraps a convolution in a kCustom fusion; the fusion takes the inner op's kind.
  conv = (
    "convolution(%param_0, %param_1), dim_labels=b01f_01io->b01f, "
    'metadata={op_name="jit(f)/transpose(jvp(Net))/Conv_0/conv_general_dilated"}'
  )
  hlo = """HloModule m
%fused_conv (param_0: f32[2,8,8,8], param_1: f32[3,3,8,16]) -> f32[2,8,8,16] {
  %param_0 = f32[2,8,8,8]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,8,16]{3,2,1,0} parameter(1)
  ROOT %convolution.3 = f32[2,8,8,16]{3,2,1,0} CONV
}
%fused_sum (param_0.1: f32[2,8,8,16]) -> f32[16] {
  %param_0.1 = f32[2,8,8,16]{3,2,1,0} parameter(0)
  ROOT %reduce.1 = f32[16]{0} reduce(%param_0.1), dimensions={0,1,2}
}
ENTRY %main (x: f32[2,8,8,8], k: f32[3,3,8,16]) -> f32[16] {
  %x = f32[2,8,8,8]{3,2,1,0} parameter(0)
  %k = f32[3,3,8,16]{3,2,1,0} parameter(1)
  %conv_fusion = f32[2,8,8,16]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%fused_conv
  ROOT %sum_fusion = f32[16]{0} fusion(%conv_fusion), kind=kCustom, calls=%fused_sum
}
""".replace("CONV", conv)
  ops = op_profile.hlo_ops(hlo)
  assert ops["conv_fusion"]["kind"] == "conv input grad"
  assert ops["conv_fusion"]["op_name"].endswith("Conv_0/conv_general_dilated")
  assert ops["sum_fusion"]["kind"] == "fusion: custom"


def test_time_by_module_sums_every_block_and_tells_the_direction():
  fwd = "jit(train_step)/jvp(Segmenter)/Segmenter.encode/backbone/block_3/depthwise_conv/mul"
  bwd = (
    "jit(train_step)/transpose(jvp(Segmenter))/Segmenter.encode/backbone/block_7/depthwise_conv/pad"
  )
  assert op_profile.layer_of(fwd) == "depthwise_conv (forward)"
  assert op_profile.layer_of(bwd) == "depthwise_conv (backward)"
  assert op_profile.layer_of("jit(f)/jvp(f)/mul") == "(no module) (forward)"
  ops = {
    "a": {"op_name": fwd},
    "b": {"op_name": fwd.replace("block_3", "block_4")},
    "c": {"op_name": bwd},
    "d": {"op_name": fwd.replace("depthwise_conv", "project_bn")},
  }
  layers = op_profile.per_layer({"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}, ops)
  assert layers == {
    "depthwise_conv (forward)": 3.0,
    "depthwise_conv (backward)": 4.0,
    "project_bn (forward)": 8.0,
  }


def test_env_b_sets_variables_for_the_block_and_restores_them(monkeypatch):
  monkeypatch.setenv("S4JAX_TEST_KEPT", "before")
  monkeypatch.delenv("S4JAX_TEST_NEW", raising=False)
  with train_step.environment(["S4JAX_TEST_KEPT=inside", "S4JAX_TEST_NEW=x=y"]):
    assert os.environ["S4JAX_TEST_KEPT"] == "inside"
    assert os.environ["S4JAX_TEST_NEW"] == "x=y"  # only the first "=" separates
  assert os.environ["S4JAX_TEST_KEPT"] == "before"
  assert "S4JAX_TEST_NEW" not in os.environ
  with pytest.raises(train_step.app.UsageError, match="NOT_AN_ASSIGNMENT"):
    with train_step.environment(["NOT_AN_ASSIGNMENT"]):
      pass
