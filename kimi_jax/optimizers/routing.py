"""Which parameters Muon orthogonalises, and along which axes.

A routing tree has the params' structure; each leaf is an
`optax.contrib.MuonDimensionNumbers` (Muon, with its reduction/output axes; every other axis
is a batch axis orthogonalised independently) or None (AdamW). The same tree is accepted by
`optax.contrib.muon(muon_weight_dimension_numbers=...)`.
"""
from typing import Any, Union

import jax
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

# Embeddings and the LM head are lookup tables / vocabulary projections, norms and biases are
# vectors: AdamW trains them (Moonlight, K2).
ADAM_NAMES = ("embed_tokens", "embedding", "lm_head", "scale", "bias")
MATRIX = MuonDimensionNumbers(reduction_axis=0, output_axis=1)

DimensionNumbers = Union[MuonDimensionNumbers, None]
RoutingSpec = Any  # None, a routing tree, or a callable params -> routing tree


def path_name(path) -> str:
  """'layers_0/attn/q_proj/kernel' for a jax key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def route_by_path(params, adam_names=ADAM_NAMES, stacked: DimensionNumbers = None):
  """Routing tree from parameter paths and ranks.

  A leaf goes to AdamW if any key on its path is in `adam_names` or it has rank < 2; a 2-D
  leaf goes to Muon as an (in_features, out_features) matrix; a leaf of rank > 2 goes to Muon
  with the declared `stacked` axes (e.g. `MuonDimensionNumbers(1, 2)` for [layers, in, out]),
  and is an error when none are declared. Use `functools.partial` to override the defaults.
  """
  def route(path, leaf):
    if set(path_name(path).split("/")) & set(adam_names) or leaf.ndim < 2:
      return None
    if leaf.ndim == 2:
      return MATRIX
    if stacked is None:
      raise ValueError(f"parameter {path_name(path)!r} has shape {leaf.shape}: declare its "
                       "reduction/output axes (route_by_path(stacked=...) or a routing tree)")
    return stacked

  return jax.tree_util.tree_map_with_path(route, params)


def route_by_logical_axes(logical_specs, adam_axes=("vocab", "norm"),
                          stacked_axes=("layers",)):
  """Routing tree from a tree of logical-axis PartitionSpecs (e.g. `param_logical_specs`).

  AdamW for rank < 2 or any axis in `adam_axes`; otherwise the axes in `stacked_axes` are
  batch axes and the remaining two are (reduction, output) in that order.
  """
  def route(path, spec):
    names = tuple(spec)
    if len(names) < 2 or set(names) & set(adam_axes):
      return None
    matrix_axes = [ax for ax, name in enumerate(names) if name not in stacked_axes]
    if len(matrix_axes) != 2:
      raise ValueError(f"parameter {path_name(path)!r} with logical axes {names}: expected two "
                       f"axes besides {stacked_axes}, declare its routing explicitly")
    return MuonDimensionNumbers(*matrix_axes)

  return jax.tree_util.tree_map_with_path(
      route, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _is_routing_leaf(x) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def leaf_routing(tree, spec: RoutingSpec) -> dict:
  """{key path: dimension numbers or None} for every leaf of `tree`.

  `spec` is a routing tree with `tree`'s structure, a callable returning one, or None (every
  leaf is a plain matrix). `tree` may be a masked subtree (`optax.partition` replaces other
  groups' leaves by empty nodes); only its own leaves are looked up.
  """
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if spec is None:
    return {path: MATRIX for path in paths}
  routing = spec(tree) if callable(spec) else spec
  flat = dict(jax.tree_util.tree_flatten_with_path(routing, is_leaf=_is_routing_leaf)[0])
  missing = [path_name(p) for p in paths if p not in flat]
  if missing:
    raise ValueError(f"routing tree has no entry for parameters {missing}")
  return {path: flat[path] for path in paths}


def labels(params, spec: RoutingSpec):
  """'muon' / 'adam' label tree for `optax.partition`."""
  routing = leaf_routing(params, spec)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "adam" if routing[path] is None else "muon", params)
