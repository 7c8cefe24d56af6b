"""Section "icl": zero/one/few-shot accuracy of the pre-trained decoder on the world's
pattern tasks; choices scored by log-likelihood, no gradient (fastpt.icl)."""

from __future__ import annotations

from fastpt.demo.config import ICL_POOL


def run(ctx, sec) -> None:
    from fastpt.icl import few_shot_table
    cfg = ctx.config
    model, tokenizer = ctx.decoder(sec)
    world = ctx.world
    tasks = {task: (world.icl(task, cfg.icl_items, seed=5), world.icl(task, ICL_POOL, seed=6))
             for task in cfg.icl_tasks}
    rows = few_shot_table(model, tokenizer, tasks, cfg.icl_shots, on_row=lambda r: print(
        f"{r['task']:<10} {r['k']}-shot: accuracy {100 * r['acc']:.0f}% (n={r['n']})", flush=True))
    acc = {(r["task"], r["k"]): r["acc"] for r in rows}
    choices = {task: len(items[0]["choices"]) for task, (items, _) in tasks.items()}
    table = [[f"`{task}`", choices[task], f"{100 / choices[task]:.0f}%",
              *(f"{100 * acc[task, k]:.0f}%" for k in cfg.icl_shots)] for task in tasks]
    sec.table(["task", "choices", "chance", *(f"{k}-shot" for k in cfg.icl_shots)], table, caption=(
        f"The pre-trained {cfg.decoder_preset} decoder, {cfg.icl_items} items per task, "
        "examples drawn from a separate pool; the choice with the highest log-likelihood "
        "is the answer."))
