"""VAP-Data loader settings: the official SFT recipe (VAP_SPEC §5.3-5.4, training.json).

  from configs.vap_data import get_config
  from vap_jax.data import make_loader
  loader = make_loader(get_config().data)   # or get_config('wan') for 49x480x832

Arg: 'cog' (default, 49x480x720) or 'wan' (49x480x832); '3ref' adds the 3-reference ablation.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = set((arg or 'cog').split(','))
  config = ml_collections.ConfigDict()
  config.data = dict(
      root='data/VAP-Data',
      meta_csv='vap_data.csv',
      benchmark_csv='benchmark/benchmark.csv',
      fps=16,
      buckets=[[49, 480, 832]] if 'wan' in args else [[49, 480, 720]],  # (frames, height, width)
      frames_selection='evenly',
      resize_mode='bicubic',
      output_dtype='float32',
      sample_ref_videos_num=1,
      mask_ref_ratio=0.0,
      mask_caption_ratio=0.02,
      alignment_score_threshold=0.0 if 'cog' in args else 10.0,
      remove_llm_prefixes=True,
      truncate_multiple=48,
      max_samples=None,
      seed=42,
      num_epochs=None,              # None: repeat forever, a new shuffle each epoch
      batch_size=1,                 # per process
      workers=4,                    # grain mp_prefetch processes; 0 decodes in the caller
      read_threads=1,               # decode threads per worker
      worker_buffer=2,
      max_failure_fraction=0.05,    # of samples seen; stop with the worst offenders above this
      min_samples_before_cap=100,
      max_bad_row_fraction=0.05,    # of table rows; bad rows are dropped and listed, above this
      strict_table=False,           # True: refuse a table with any bad row
  )
  if '3ref' in args:
    config.data.update(sample_ref_videos_num=3, mask_ref_ratio=0.3, mask_caption_ratio=0.1,
                       alignment_score_threshold=10.0)
  return config
