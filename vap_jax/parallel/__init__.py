"""Device mesh, logical->mesh sharding rules and activation constraints."""
from vap_jax.parallel.sharding import (DEFAULT_RULES, FSDP_CONTEXT_RULES, MESH_AXES, TOKEN_AXES,
                                       VAE_RULES, constrain, logical_to_spec, make_mesh,
                                       param_shardings, parse_mesh_shape, sharding_context,
                                       with_rules)

__all__ = ['DEFAULT_RULES', 'FSDP_CONTEXT_RULES', 'MESH_AXES', 'TOKEN_AXES', 'VAE_RULES',
           'constrain', 'logical_to_spec', 'make_mesh', 'param_shardings', 'parse_mesh_shape',
           'sharding_context', 'with_rules']
