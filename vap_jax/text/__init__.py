"""Text side of the pipelines: tokenizers from checkpoint folders, prompt cleaning, prompt encoding."""
from vap_jax.text.prompts import (COGVIDEOX_MAX_LENGTH, WAN_MAX_LENGTH, encode_cogvideox,
                                  encode_wan)
from vap_jax.text.tokenizer import Tokenizer, prompt_clean

__all__ = ['COGVIDEOX_MAX_LENGTH', 'WAN_MAX_LENGTH', 'Tokenizer', 'encode_cogvideox', 'encode_wan',
           'prompt_clean']
