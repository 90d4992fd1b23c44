"""Device mesh, logical->mesh sharding rules and activation constraints."""
from vap_jax.parallel.sharding import (MESH_AXES, DEFAULT_RULES, TOKEN_AXES, constrain, logical_to_spec,
                                       make_mesh, param_shardings, parse_mesh_shape,
                                       sharding_context)

__all__ = ['MESH_AXES', 'DEFAULT_RULES', 'TOKEN_AXES', 'constrain', 'logical_to_spec', 'make_mesh',
           'param_shardings', 'parse_mesh_shape', 'sharding_context']
