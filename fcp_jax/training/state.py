"""Train state and the model/state builders shared by every driver.

    model, model_cfg = build_model(config.model)        # variant + field overrides
    init_fn = make_init_fn(model, tx)                    # rng -> TrainState (unboxed)
    specs = state_logical_specs(model, tx)               # TrainState of PartitionSpecs

``TrainState`` holds plain (unboxed) arrays; the logical axis names of the parameters
(``nn.Partitioned`` metadata of the Linen module) are kept separately as a
``TrainState`` of ``PartitionSpec`` so that ``sharding.py`` can place every leaf,
optimizer moments included, with the same rules.
"""

from typing import Any, Callable, Mapping, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fcp_jax.models import transformer

INIT_SEQ_LEN = 8  # Parameter shapes do not depend on the sequence length.


@flax.struct.dataclass
class TrainState:
  """Everything a training step updates. A pytree; donated to the jitted step."""
  step: jax.Array      # [] int32: number of updates applied so far.
  params: Any          # Unboxed parameter tree.
  opt_state: Any       # optax state.
  rng: jax.Array       # [2] uint32 base key; step keys are fold_in(rng, step).


def model_config(model_cfg: Mapping[str, Any]) -> transformer.TransformerConfig:
  """``TransformerConfig`` of ``model_cfg.variant`` with the other keys as overrides."""
  return transformer.from_config(model_cfg)


def build_model(model_cfg: Mapping[str, Any]
                ) -> Tuple[transformer.Transformer, transformer.TransformerConfig]:
  cfg = model_config(model_cfg)
  return transformer.Transformer(cfg), cfg


def _dummy_tokens():
  return jnp.zeros((1, INIT_SEQ_LEN), jnp.int32)


def init_boxed_params(model: nn.Module, rng: jax.Array) -> Any:
  """Parameters with their ``nn.Partitioned`` boxes (logical axis names)."""
  return model.init(rng, _dummy_tokens())["params"]


def param_logical_specs(model: nn.Module) -> Any:
  """Tree of ``PartitionSpec`` of logical axis names, one per parameter."""
  abstract = jax.eval_shape(lambda rng: init_boxed_params(model, rng),
                            jax.random.PRNGKey(0))
  return nn.get_partition_spec(abstract)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation
                 ) -> Callable[[jax.Array], TrainState]:
  """``init(rng) -> TrainState`` at step 0; jit it with output shardings."""

  def init(rng: jax.Array) -> TrainState:
    param_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(init_boxed_params(model, param_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  return init


def state_logical_specs(model: nn.Module, tx: optax.GradientTransformation) -> TrainState:
  """``TrainState`` of logical ``PartitionSpec``s: moments follow their parameters."""
  param_specs = param_logical_specs(model)
  abstract = jax.eval_shape(make_init_fn(model, tx), jax.random.PRNGKey(0))
  is_spec = lambda x: isinstance(x, P)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract.opt_state, param_specs,
      transform_non_params=lambda _: P(), is_leaf=is_spec)
  return TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())
