"""The training and evaluation subcommands of the ``fastpt`` CLI (pretrain, finetune,
generate, eval), each a module with ``register(subparsers)``; options in
:mod:`fastpt.commands.options`."""
