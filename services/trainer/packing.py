"""Sequence packing for SFT: several episodes per fixed-length row, none attending to another.

A row of length L holds episodes back to back, each with positions restarting at 0, then padding:

    input_ids   [p p p r r | p p r r r | pad pad]        (p prompt, r response)
    positions   [0 1 2 3 4 | 0 1 2 3 4 | 0   1  ]
    targets     ids[1:]          mask[j] = 1 where ids[j+1] is a trained response token

The model gets `position_ids` and no attention mask. transformers (5.x, masking_utils
`find_packed_sequence_indices`) reads a position that does not follow its predecessor by 1 as the
start of a new sequence and builds a block-diagonal causal mask for eager/SDPA/flex attention;
flash-attention uses the same boundaries as varlen cu_seqlens. So each episode sees exactly what
it would see alone, and the loss equals the unpacked one (tests/test_trainer_packing.py checks
loss, gradients and that one episode's tokens cannot move another's logprobs).

No target crosses a boundary: the last token of an episode would predict the next episode's first
token, a prompt token, which is never in the mask (prompts are non-empty).
"""

from __future__ import annotations

import torch


def pack(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows of at most `row_length` tokens.

    Longest first, each into the first row with room; deterministic (ties keep input order).

    Raises:
        ValueError: an item is longer than a row.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_length:
            raise ValueError(f"item {i} has {lengths[i]} tokens, over the row length {row_length}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_length - lengths[i])
    return rows


def packed_batch(rows: list[list[tuple[list[int], list[int], list[int]]]], row_length: int, pad_id: int):
    """Tensors for rows of (prompt ids, response ids, response mask) episodes.

    Returns:
        input_ids, position_ids (n_rows, row_length) long; targets (n_rows, row_length - 1) long;
        mask (n_rows, row_length - 1) float: 1.0 where the target is a trained response token.
    """
    n = len(rows)
    ids = torch.full((n, row_length), pad_id, dtype=torch.long)
    positions = torch.zeros((n, row_length), dtype=torch.long)
    mask = torch.zeros((n, row_length - 1))
    for i, row in enumerate(rows):
        at = 0
        for prompt, response, trained in row:
            p, length = len(prompt), len(prompt) + len(response)
            ids[i, at:at + length] = torch.tensor(prompt + response)
            positions[i, at:at + length] = torch.arange(length)
            # Column c predicts token c + 1: response token k (at at+p+k) is predicted at at+p+k-1.
            mask[i, at + p - 1:at + length - 1] = torch.tensor(trained, dtype=torch.float32)
            at += length
        positions[i, at:] = torch.arange(row_length - at)  # padding: a sequence of its own, never trained
    return ids, positions, ids[:, 1:], mask
