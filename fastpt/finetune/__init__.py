"""Fine-tuning: task heads; full, partial and feature-based training; LoRA (also on an int8
base), adapters, prefix and prompt tuning, IA3, BitFit; sentence embeddings; DPO."""

from fastpt.finetune.dpo import DPO, dpo_loss, sequence_logprobs
from fastpt.finetune.embeddings import embed, encode, in_batch_negatives_loss, triplet_loss
from fastpt.finetune.heads import (QuestionAnswering, SequenceClassifier, TokenClassifier,
                                   prompt_masked_labels)
from fastpt.finetune.lora import (add_lora, disable_adapter, merge, merge_and_unload, set_adapter,
                                  unmerge)
from fastpt.finetune.save import load_adapter, load_merged, save_adapter, save_merged
from fastpt.finetune.strategies import (STRATEGIES, FinetuneConfig, count_parameters, prepare,
                                        print_trainable_parameters, trainable_parameters_summary)

__all__ = ["DPO", "STRATEGIES", "FinetuneConfig", "QuestionAnswering", "SequenceClassifier",
           "TokenClassifier", "add_lora", "count_parameters", "disable_adapter", "dpo_loss", "embed",
           "encode", "in_batch_negatives_loss", "load_adapter", "load_merged", "merge", "merge_and_unload",
           "prepare", "print_trainable_parameters", "prompt_masked_labels", "save_adapter", "save_merged",
           "sequence_logprobs", "set_adapter", "trainable_parameters_summary", "triplet_loss", "unmerge"]
