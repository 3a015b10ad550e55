"""Where a compiled step's time goes: per-op times from a profiler trace, by kind of op.

`profile(step, hlo_text, steps)` runs ``step()`` (a call of a compiled program) under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`, no TensorBoard
needed), and joins each event the XLA runtime records per op (a "thunk", named as the op in
the optimised HLO) to that op in the program's text (``compiled.as_text()``). `print_table`
sums the time per kind:

  conv forward / conv input grad / conv weight grad (XLA)   convolutions (and the 1x1 ones
      XLA rewrites as products), told apart by the JAX operation that made them (inside
      "transpose(...)": backward) and by their output (kernel-shaped: a weight gradient)
  conv weight grad (products)   the dot ops of conv_ops.weight_grad_by_matmul (its named scope)
  other dot                     every other matrix product (heads, projections, attention)
  fusion: <kind>                XLA's fused elementwise / reduction / transpose kernels
  <opcode>                      the rest (copy, reduce-window, select-and-scatter, sort ...)

the same time per Flax module (`layer_of`: the innermost module of each op's JAX
operation, forward or backward), and the slowest single ops with the JAX operation that
made them. Times are summed over the runtime's threads: on 2 cores two independent ops can
run at once, so the sum can exceed the step's wall time.
"""

import collections
import glob
import os
import re
import shutil
import tempfile

import jax

# One HLO instruction: "%name = type opcode(operands), attributes".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
# A computation's first line: "[ENTRY ]%name (params) -> type {".
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")

WEIGHT_GRAD_SCOPE = "conv_weight_grad_by_matmul"


def _dims(shape: str) -> tuple[int, ...] | None:
  """The dimensions of an HLO array type "f32[2,3,3,16]{...}", or None for tuples."""
  match = re.match(r"\w+\[([\d,]*)\]", shape)
  if not match:
    return None
  return tuple(int(d) for d in match.group(1).split(",") if d)


def _kernel_key(dims) -> tuple[int, ...]:
  # A kernel [kh, kw, C, O] and its gradient in whatever layout XLA picked (for a 1x1
  # convolution rewritten as a product, [C, O]) agree on their dimensions other than 1.
  return tuple(sorted(d for d in dims if d != 1))


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"opcode", "kind", "op_name", "shape"}} of every instruction."""
  computations = {}  # computation name -> [(name, shape, opcode, rest, op_name)]
  current = None
  kernels = set()
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      in_entry = bool(header.group(1))
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, shape, opcode, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    computations[current].append((name, shape, opcode, rest, op_name.group(1) if op_name else ""))
    dims = _dims(shape)
    # Convolution kernels reach the step as rank-4 floating-point parameters of the
    # program (the state); the fused computations' parameters are not the program's.
    if in_entry and opcode == "parameter" and dims and len(dims) == 4 and shape[:1] in "fb":
      kernels.add(_kernel_key(dims))
  ops = {}
  for instructions in computations.values():
    for name, shape, opcode, rest, op_name in instructions:
      kind = _kind(opcode, op_name, _dims(shape), kernels)
      if opcode == "fusion":
        # XLA:CPU wraps convolutions and products in fusions (kind=kCustom, with the
        # library call inside): a fusion is what its convolution or product is.
        called = _CALLS.search(rest)
        for inner in computations.get(called.group(1), []) if called else []:
          inner_kind = _kind(inner[2], inner[4] or op_name, _dims(inner[1]), kernels)
          if inner_kind.startswith("conv") or inner_kind == "other dot":
            kind, op_name = inner_kind, inner[4] or op_name
            break
        else:
          fusion_kind = _FUSION_KIND.search(rest)
          kind = f"fusion: {fusion_kind.group(1)[1:].lower() if fusion_kind else '?'}"
      ops[name] = {"opcode": opcode, "op_name": op_name, "shape": shape, "kind": kind}
  return ops


def _kind(opcode, op_name, dims, kernels) -> str:
  if WEIGHT_GRAD_SCOPE in op_name:
    return "conv weight grad (products)"
  is_conv = opcode == "convolution"
  # XLA rewrites 1x1 convolutions as products; the JAX operation name still says so.
  if opcode == "dot" and op_name.endswith("conv_general_dilated"):
    is_conv = True
  if is_conv:
    backward = "transpose(" in op_name
    kernel_shaped = dims is not None and _kernel_key(dims) in kernels
    if kernel_shaped and (backward or not op_name):
      # XLA's backward-filter convolution; its rewrites often drop the operation name.
      return "conv weight grad (XLA)"
    if backward:
      return "conv input grad"
    return "conv forward" if op_name else "conv (unattributed)"
  if opcode == "dot":
    return "other dot"
  return opcode


def trace_events(fn, steps: int) -> list[tuple[str, float]]:
  """[(event name, seconds)] of the XLA runtime's op events while ``fn()`` runs `steps` times
  (``fn`` blocks until its results are ready)."""
  log_dir = tempfile.mkdtemp(prefix="s4jax_profile_")
  try:
    with jax.profiler.trace(log_dir):
      for _ in range(steps):
        fn()
    paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    events = []
    for plane in data.planes:
      for line in plane.lines:
        if line.name == "python":
          continue
        for event in line.events:
          events.append((event.name, event.duration_ns * 1e-9))
    return events
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)


def profile(step, hlo_text: str, steps: int):
  """(per-kind seconds per step, per-op seconds per step, HLO op table) of `steps` calls of
  ``step()``, which runs the compiled program whose optimised HLO is ``hlo_text``."""

  def call():
    jax.block_until_ready(step())

  ops = hlo_ops(hlo_text)
  per_op = collections.Counter()
  for name, seconds in trace_events(call, steps):
    if name in ops:
      per_op[name] += seconds / steps
  per_kind = collections.Counter()
  for name, seconds in per_op.items():
    per_kind[ops[name]["kind"]] += seconds
  return per_kind, per_op, ops


def _without_jit(op_name: str) -> str:
  return re.sub(r"jit\([\w]+\)/", "", op_name)


def _short(op_name: str, width: int = 70) -> str:
  # Drop the jit(...) wrappers; keep the tail, which names the operation and its transform.
  op_name = _without_jit(op_name)
  return op_name if len(op_name) <= width else "..." + op_name[-(width - 3) :]


def layer_of(op_name: str) -> str:
  """The innermost module an op came from, and whether it is forward or backward:
  ``"jvp(Segmenter)/Segmenter.encode/backbone/block_3/depthwise_conv/mul"`` ->
  ``"depthwise_conv (forward)"``. Ops of every block share the module's name, so the
  table below sums, e.g., all depthwise convolutions together."""
  parts = _without_jit(op_name).split("/")[:-1]  # the last part is the primitive
  modules = [p for p in parts if p and "(" not in p and "." not in p]
  direction = "backward" if "transpose(" in op_name else "forward"
  return f"{modules[-1] if modules else '(no module)'} ({direction})"


def per_layer(per_op, ops):
  """Seconds per step summed by `layer_of` each op's JAX operation."""
  layers = collections.Counter()
  for name, seconds in per_op.items():
    layers[layer_of(ops[name]["op_name"])] += seconds
  return layers


def print_table(per_kind, per_op, ops, step_seconds: float, top: int = 15) -> None:
  """The per-kind table (seconds per step, share of the op time and of the step), the
  same time by module (`per_layer`) and the `top` slowest ops."""
  total = sum(per_kind.values())
  print(
    f"per-op profile: {total:.3f} s of op time per step (summed over threads), "
    f"step wall time {step_seconds:.3f} s"
  )
  print(f"  {'kind':34s} {'s/step':>8s} {'% ops':>6s} {'% step':>7s}")
  for kind, seconds in per_kind.most_common():
    print(
      f"  {kind:34s} {seconds:8.3f} {100 * seconds / total:6.1f} "
      f"{100 * seconds / step_seconds:7.1f}"
    )
  print(f"  by module (the {top} largest):")
  for layer, seconds in per_layer(per_op, ops).most_common(top):
    print(f"  {layer:44s} {seconds:8.3f} {100 * seconds / total:6.1f}")
  print(f"  slowest {top} ops:")
  for name, seconds in per_op.most_common(top):
    op = ops[name]
    print(
      f"  {seconds * 1e3:8.1f} ms  {op['kind']:28s} {op['shape'][:34]:34s} {_short(op['op_name'])}"
    )
