"""VAP-Data: PyAV video io, the table schema and pairing rules, the Grain pipeline, and the
precomputed-latent shards (`precompute` writes them, `latent_source` reads them)."""
from vap_jax.data.latent_source import LatentSource, make_latent_loader
from vap_jax.data.pipeline import (DataFailureError, FailureCounter, VapLoader,
                                   default_data_config, make_loader)
from vap_jax.data.vap_data import (PairingConfig, SchemaError, build_pair_table,
                                   read_benchmark_csv, read_vap_csv, read_vap_table,
                                   remove_llm_prefix, sample_pair)
from vap_jax.data.video_io import VideoError, load_clip, read_video, write_gif, write_mp4, \
  write_png_strip

__all__ = ['DataFailureError', 'FailureCounter', 'VapLoader', 'default_data_config', 'make_loader',
           'PairingConfig', 'SchemaError', 'build_pair_table', 'read_benchmark_csv', 'read_vap_csv',
           'read_vap_table', 'remove_llm_prefix', 'sample_pair', 'VideoError', 'load_clip',
           'read_video', 'write_gif', 'write_mp4', 'write_png_strip', 'LatentSource',
           'make_latent_loader']
# The writer (`vap_jax.data.precompute`) loads models: import it from its module.
