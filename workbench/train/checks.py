"""Does the base model know the chat template's special tokens?

A base model (Llama-3-8B, not -Instruct) has rows for `<|eot_id|>`, `<|start_header_id|>`, ... in its
embedding matrices that were never trained: near zero, or all the same vector. LoRA does not train
embeddings, so such a model learns the template poorly and may never emit the end-of-turn token.
"""

from __future__ import annotations

import torch

from workbench.io.blocks import row_blocks

NEAR_ZERO = 0.05  # a row norm below this fraction of the median row norm is "near zero"


def untrained_special_tokens(model, token_ids: list[int], tokenizer) -> list[str]:
    """One warning line per embedding matrix in which the template's special tokens look untrained."""
    matrices = [("input", model.get_input_embeddings())]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0][1].weight:
        matrices.append(("output", output))
    warnings = []
    for kind, module in matrices:
        weight = module.weight.detach()
        if weight.numel() == 0 or not token_ids:  # partitioned (ZeRO-3): not checkable here
            continue
        suspects = _suspects(weight, [t for t in token_ids if t < weight.shape[0]])
        if suspects:
            names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(suspects)))
            warnings.append(
                f"the chat template's special tokens {names} look untrained in the {kind} embeddings of the base "
                "model (near-zero or identical rows): is it a base model rather than an instruct one? LoRA does not "
                "train embeddings, so the model may not learn to stop; consider --template default"
            )
    return warnings


def _suspects(weight: torch.Tensor, ids: list[int]) -> set[int]:
    blocks = row_blocks(tuple(weight.shape))  # no full fp32 copy
    norms = torch.cat([weight[start:stop].float().norm(dim=1) for start, stop in blocks])
    reference = float(norms.median())
    rows = weight[ids].float()
    suspects = {t for t, norm in zip(ids, norms[ids].tolist()) if norm <= NEAR_ZERO * reference}
    for i, a in enumerate(ids):
        for j in range(i + 1, len(ids)):
            if torch.equal(rows[i], rows[j]):
                suspects.update((a, ids[j]))
    return suspects
