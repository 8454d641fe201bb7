"""Distillation (Hinton, Vinyals & Dean 2015): losses, soft-target cache, transfer sets, the stage.

Modules: ``losses`` (kd / soft / logits, pure), ``transfer`` (transfer-set selection and
the omitted-class bias fit, pure), ``cache`` (teacher scores computed once, memory-mapped),
``teachers`` (run folders -> log-probability teachers), ``loop`` (fit() loss functions,
DDP helpers), ``config`` (``DistillConfig``) and ``stage`` (``run(cfg, run_dir)``).
"""
