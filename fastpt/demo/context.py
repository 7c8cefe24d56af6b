"""What the demo's sections share: the config, the output folder, the embedded world, and
the pre-trained models (fine-tuning and in-context learning reuse the decoder of the
pre-training section, or pre-train it themselves when that section was not selected)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from fastpt.demo.config import DemoConfig


@dataclass
class Context:
    config: DemoConfig
    out_dir: str
    pretrained: dict = field(default_factory=dict)   # "encoder" / "decoder" -> PretrainResult
    _world: object = None

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    @property
    def world(self):
        from fastpt.data.world import World
        if self._world is None:
            self._world = World(self.config.seed)
        return self._world

    def pretrain(self, kind: str):
        """Pre-trains the encoder (MLM) or decoder (causal LM) of the config on the world
        corpus, keeps it for later sections and saves it (HF layout + tokenizer) into
        ``<out>/<kind>/`` so that ``fastpt generate`` / ``eval`` can load it."""
        from fastpt.train import recipes
        cfg = self.config
        steps = cfg.encoder_steps if kind == "encoder" else cfg.decoder_steps
        common = dict(n_docs=cfg.n_docs, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                      max_steps=steps, seed=cfg.seed, world=self.world, progress=cfg.progress,
                      log_every=max(1, steps // 60), lr=cfg.pretrain_lr)
        run_dir = self.path(f"pretrain-{kind}")
        if kind == "encoder":
            result = recipes.pretrain_encoder(run_dir, preset=cfg.encoder_preset, batch_size=32,
                                              **common)
        else:
            result = recipes.pretrain_decoder(run_dir, preset=cfg.decoder_preset, batch_size=8,
                                              **common)
        recipes.save_pretrained_with_tokenizer(result, self.path(kind))
        self.pretrained[kind] = result
        return result

    def decoder(self, sec):
        """(model, tokenizer) of the pre-trained decoder, pre-training it first if needed; that
        run is then described in the report's section ``sec`` (its time counts in it)."""
        if "decoder" not in self.pretrained:
            cfg = self.config
            print(f"(pre-training the {cfg.decoder_preset} decoder first: "
                  f"{cfg.decoder_steps} causal-LM steps)", flush=True)
            start = time.perf_counter()
            losses = [r["loss"] for r in self.pretrain("decoder").metrics if r.get("loss") is not None]
            loss = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"
            sec.text(f"The pre-training section was not selected, so this section first pre-trained "
                     f"the {cfg.decoder_preset} decoder: {cfg.decoder_steps} causal-LM steps in "
                     f"{time.perf_counter() - start:.0f} s, {loss} (saved in `decoder/`).")
        result = self.pretrained["decoder"]
        return result.model, result.tokenizer
