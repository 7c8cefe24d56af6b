"""Transformer models on fastpt's kernels: BERT-style :class:`Encoder`, GPT-2/Llama-style
:class:`Decoder`, T5-style :class:`Seq2Seq`; generation with a static KV cache; Hugging
Face checkpoints (``from_pretrained`` / ``save_pretrained``, ``from_hf`` / ``to_hf``)."""

from fastpt.models.cache import KVCache, Seq2SeqCache
from fastpt.models.config import DecoderConfig, EncoderConfig, Seq2SeqConfig, config_from_dict, from_name
from fastpt.models.decoder import Decoder
from fastpt.models.encoder import Encoder
from fastpt.models.generation import generate
from fastpt.models.hf import CheckpointError, from_hf, from_pretrained, to_hf
from fastpt.models.outputs import DecoderOutput, EncoderOutput, Seq2SeqOutput
from fastpt.models.seq2seq import Seq2Seq

__all__ = ["CheckpointError", "Decoder", "DecoderConfig", "DecoderOutput", "Encoder", "EncoderConfig",
           "EncoderOutput", "KVCache", "Seq2Seq", "Seq2SeqCache", "Seq2SeqConfig", "Seq2SeqOutput",
           "config_from_dict", "from_hf", "from_name", "from_pretrained", "generate", "to_hf"]
