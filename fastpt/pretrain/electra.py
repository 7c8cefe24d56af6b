"""ELECTRA replaced-token detection (Clark et al. 2020).

A small generator (an MLM ``Encoder`` with ~1/4 of the discriminator's width) fills the masked
positions with tokens sampled from its softmax (no gradient through the sampling); the
discriminator (a full ``Encoder``) labels every non-padding token as original or replaced.
loss = L_MLM(generator) + 50 * L_disc. The two share the embedding layer (token, position and
segment embeddings): the generator reads the discriminator's embeddings through a linear
projection to its own width (``embeddings_project`` in HF's ELECTRA), and its MLM head maps
back to the embedding width to score tokens against the shared token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpt.models import Encoder, EncoderConfig
from fastpt.models.common import check_labels
from fastpt._checks import check_int
from fastpt.pretrain.mlm import IGNORE_INDEX

DISC_WEIGHT = 50.0


class _SharedEmbeddings(nn.Module):
    """The discriminator's embedding layer, projected to the generator's width."""

    def __init__(self, shared: nn.Module, width_in: int, width_out: int):
        super().__init__()
        self.shared = [shared]  # a list, so the shared module is not registered twice
        self.project = nn.Linear(width_in, width_out)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds) -> Tensor:
        return self.project(self.shared[0](input_ids, token_type_ids, position_ids, inputs_embeds))


class _GeneratorHead(nn.Module):
    """dense (generator width -> embedding width) + GELU + LayerNorm, scored against the
    shared token embeddings, with its own bias."""

    def __init__(self, width: int, embed_width: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, embed_width)
        self.norm = nn.LayerNorm(embed_width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, token_embeddings: Tensor) -> Tensor:
        h = self.norm(nn.functional.gelu(self.dense(h)))
        return nn.functional.linear(h, token_embeddings, self.bias)


@dataclass
class ElectraOutput:
    loss: Tensor
    mlm_loss: Tensor
    disc_loss: Tensor
    disc_logits: Tensor       # (B, T): > 0 means "replaced"
    is_replaced: Tensor       # (B, T) bool: the discriminator's labels
    disc_accuracy: Tensor     # over non-padding tokens


class Electra(nn.Module):
    """``Electra(discriminator_config, generator_scale=4)``; batches from ``MLMCollator``.

    ``model(input_ids, attention_mask, labels, token_type_ids=None)``: ``input_ids`` carry the
    MLM corruption and ``labels`` the original ids at the selected positions (-100 elsewhere).
    After pre-training, ``model.discriminator`` is the encoder to fine-tune. The replacements
    are sampled from torch's global generator (seeded by ``torch.manual_seed``), whose state
    the Trainer's checkpoints hold, so a resumed run samples what the uninterrupted one did.
    """

    # The pooler, MLM and NSP heads of both encoders get no gradient (the generator scores with
    # ``generator_head``, the discriminator with ``disc_head``). They stay: ``discriminator`` is a
    # whole ``Encoder`` to fine-tune, and checkpoints keep their layout. DDP must skip them.
    ddp_find_unused_parameters = True

    @staticmethod
    def loss_terms(batch: dict) -> dict[str, tuple[float, Tensor]]:
        """``loss`` term by term for the Trainer: ``mlm_loss`` is a mean over the masked tokens,
        ``disc_loss`` (weight 50) over the real (non-padding) tokens. Weighting micro-batches by
        either count alone would not give the update of one large batch."""
        return {"mlm_loss": (1.0, (batch["labels"] != IGNORE_INDEX).sum()),
                "disc_loss": (DISC_WEIGHT, batch["attention_mask"].bool().sum())}

    def __init__(self, config: EncoderConfig, generator_scale: int = 4, use_fused: bool = True):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be the discriminator's EncoderConfig, got {type(config).__name__}")
        # True passed as 1 (a generator as wide as the discriminator), 2.0 failed in EncoderConfig.
        check_int("generator_scale", generator_scale)
        if generator_scale < 1 or config.hidden_size % generator_scale:
            raise ValueError(f"generator_scale={generator_scale} must divide hidden_size={config.hidden_size}")
        width = config.hidden_size // generator_scale
        heads = max(1, config.num_heads // generator_scale)
        try:
            gen_config = config.replace(hidden_size=width, num_heads=heads,
                                        intermediate_size=max(1, config.intermediate_size // generator_scale))
        except ValueError as e:  # its message names sizes the caller never gave
            raise ValueError(f"generator_scale={generator_scale} gives a generator of hidden_size {width} with "
                             f"{heads} heads (num_heads // generator_scale), which does not work: {e}") from None
        self.discriminator = Encoder(config, use_fused=use_fused)
        self.generator = Encoder(gen_config, use_fused=use_fused)
        self.generator.embeddings = _SharedEmbeddings(self.discriminator.embeddings,
                                                      config.hidden_size, width)
        self.generator_head = _GeneratorHead(width, config.hidden_size, config.vocab_size,
                                             config.layer_norm_eps)
        self.disc_head = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.GELU(),
                                       nn.Linear(config.hidden_size, 1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                token_type_ids: Tensor | None = None) -> ElectraOutput:
        # Labels of another shape failed as an IndexError of a boolean mask, ids outside the
        # vocabulary as cross_entropy's "Target 500 is out of bounds" (a device assert on GPUs).
        gen_hidden, _ = self.generator.encode(input_ids, attention_mask, token_type_ids)  # checks input_ids
        check_labels(labels, input_ids.shape, self.discriminator.config.vocab_size)
        selected = labels != IGNORE_INDEX
        gen_logits = self.generator_head(gen_hidden[selected],
                                         self.discriminator.embeddings.tokens.weight)
        # Summed, then divided by max(1, count): labels can select nothing (no maskable token in
        # the batch, or labels from another collator), and a plain mean over zero tokens is NaN,
        # which training then spreads into every weight. With none selected the generator's loss
        # is 0 with a zero gradient and the discriminator still learns (it sees only originals).
        # MLMCollator also selects at least one token per sequence that has a maskable one.
        mlm_loss = nn.functional.cross_entropy(gen_logits.float(), labels[selected],
                                               reduction="sum") / selected.sum().clamp(min=1)
        with torch.no_grad():  # sampling is not differentiated (the paper's choice)
            probs = torch.softmax(gen_logits.float(), -1)
            sampled = torch.multinomial(probs.cpu(), 1).squeeze(1)
            corrupted = input_ids.clone()
            corrupted[selected] = sampled.to(input_ids.device)
            original = torch.where(selected, labels, input_ids)
            is_replaced = corrupted != original
        disc_hidden, _ = self.discriminator.encode(corrupted, attention_mask, token_type_ids)
        disc_logits = self.disc_head(disc_hidden).squeeze(-1)
        real = attention_mask.bool()
        disc_loss = nn.functional.binary_cross_entropy_with_logits(
            disc_logits[real].float(), is_replaced[real].float())
        accuracy = ((disc_logits[real] > 0) == is_replaced[real]).float().mean()
        return ElectraOutput(loss=mlm_loss + DISC_WEIGHT * disc_loss, mlm_loss=mlm_loss,
                             disc_loss=disc_loss, disc_logits=disc_logits,
                             is_replaced=is_replaced, disc_accuracy=accuracy)
