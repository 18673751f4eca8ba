"""Regional ``torch.compile``: each repeated transformer block compiled once, and a count of compiled graphs.

Identical blocks share one compiled graph (their parameters are graph inputs), so compiling 42 CogVideoX
blocks costs about as much as compiling one, and copying new weights into the same parameters (a weights
refresh) reuses the graph. A change of structure (a LoRA adapter added) or of input shape compiles anew.
"""

from __future__ import annotations

import torch


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes named by diffusers' ``_repeated_blocks``, else the entries
    of ``transformer_blocks`` (CogVideoX declares no ``_repeated_blocks``)."""
    names = set(getattr(model, "_repeated_blocks", None) or [])
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = getattr(model, "transformer_blocks", None)
    return list(blocks) if blocks is not None else []


def compile_blocks(model: torch.nn.Module, *, fullgraph: bool = True, mode: str | None = None,
                   dynamic: bool | None = False, eager_rounding: bool = False) -> int:
    """Compile every repeated block of ``model`` in place (lazily: the first forward compiles); returns how many.

    ``eager_rounding`` makes Inductor round low-precision intermediates as eager does (process-wide:
    ``emulate_precision_casts``). GAPO needs it: its loss is β (5000) times a difference of two forwards, a
    training graph (policy) and an inference graph (reference), which Inductor otherwise fuses differently;
    measured in bf16 on the tiny model, that alone moved the error difference by 2e-4, a margin of ~1.2."""
    if eager_rounding:
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile (no _repeated_blocks, "
                         "no transformer_blocks)")
    for block in blocks:
        block.compile(fullgraph=fullgraph, mode=mode, dynamic=dynamic)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
