"""The output head of a causal LM teacher applied per chunk of tokens, so a per-token dump never holds
the whole [batch, tokens, vocab] logits (8 GB in float32 at V=128k for 8 x 2,048 tokens).

A Hugging Face causal LM is a body (``base_model``: embeddings, blocks, final norm) returning its last
hidden states [B, T, H], then ``get_output_embeddings()``, a linear layer H -> V. When the model is
exactly that, the dump runs the body once per batch and the head on TOKEN_CHUNK tokens at a time
(``targets/tokens.py``), encoding each chunk before computing the next.

Some models do more after the linear layer (Gemma-2's ``final_logit_softcapping``, Cohere's
``logit_scale``, any custom subclass), and nothing in their structure says so. So :func:`choose_head`
decides once, on the first batch: it compares the chunked path with the model's own forward on the
batch's first tokens and keeps the forward path (one warning) when they differ or the split fails.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..targets import tokens
from .runtime import run_model

logger = logging.getLogger(__name__)

#: Products of fewer rows take another CPU GEMM kernel (below 12 rows, measured with torch's CPU BLAS) whose
#: rounding differs from the large product of the model's forward; padding a short block to this many rows
#: costs 16 x V and keeps float32 rows bit-identical to the forward path's on the CPU.
MIN_GEMM_ROWS = 16
#: Tokens of the first sequence the check runs on (at most TOKEN_CHUNK): this many rows of logits, twice.
CHECK_TOKENS = 64

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class ChunkedHead:
    """A causal LM split into ``body`` (inputs -> last hidden states) and ``head`` (an ``nn.Linear``),
    the head run under the dump's autocast (the same op, in the same dtype, as inside the forward).

    The head is called as a module, so hooks on it (accelerate's device placement) still apply.
    """

    def __init__(self, body: nn.Module, head: nn.Linear, autocast: AutocastFactory = contextlib.nullcontext) -> None:
        self.body, self.head, self.autocast = body, head, autocast

    @property
    def hidden_size(self) -> int:
        return int(self.head.in_features)

    @property
    def vocab(self) -> int:
        return int(self.head.out_features)

    def hidden(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The body's last hidden states [B, T, H], called with the model's inputs (a teacher's way)."""
        output = self.body(*args, **kwargs)
        states = getattr(output, "last_hidden_state", None)
        if states is None and isinstance(output, (tuple, list)) and output:
            states = output[0]
        if not isinstance(states, torch.Tensor):
            raise TypeError(f"{type(self.body).__name__} returned a {type(output).__name__} without last_hidden_state")
        return states

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits (n, V) of hidden rows (n, H)."""
        count = rows.shape[0]
        if 0 < count < MIN_GEMM_ROWS:
            rows = torch.cat([rows, rows.new_zeros(MIN_GEMM_ROWS - count, rows.shape[1])])
        with self.autocast():
            logits = self.head(rows)
        return logits[:count]


def split_head(module: Any) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) of a transformers causal LM whose output embeddings are a linear layer; None for
    anything else (other teachers keep their forward). Never imports transformers: a model of it means
    it is loaded already."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return None
    body = getattr(module, "base_model", None)
    try:
        head = module.get_output_embeddings()
    except Exception:  # models without an LM head raise or return None
        return None
    if not isinstance(body, nn.Module) or body is module or not isinstance(head, nn.Linear):
        return None
    return body, head


def choose_head(module: Any, inputs: Any, lengths: list[int], forward: Callable[[Any], torch.Tensor],
                autocast: AutocastFactory = contextlib.nullcontext) -> ChunkedHead | None:
    """The chunked head for the dump of ``module``, or None for its forward path; decided on the first
    batch (``inputs``, right-padded, ``lengths`` real tokens per sequence).

    ``forward(inputs)`` runs the teacher as the dump does (its failures are the teacher's: they propagate).
    The chunked path must give the forward's logits within the dtype's tolerance; if not, or if the body
    cannot be called alone, the dump keeps the forward path and says so once.
    """
    split = split_head(module)
    if split is None:
        return None
    chunked = ChunkedHead(*split, autocast)
    sample = _leading_tokens(inputs, len(lengths), max(lengths), min(lengths[0], CHECK_TOKENS, tokens.TOKEN_CHUNK))
    with autocast():
        expected = forward(inputs if sample is None else sample)
    try:
        with autocast():
            states = run_model(chunked.hidden, inputs if sample is None else sample)
        got = chunked(states.reshape(-1, states.shape[-1])).reshape(expected.shape)
        differs = _disagreement(got, expected)
    except Exception as exc:  # the body alone does not run like this: the forward path is always right
        differs = f"running its body alone failed ({type(exc).__name__}: {exc})"
    if differs is None:
        logger.debug("teacher %s: output head applied per chunk of tokens", type(module).__name__)
        return chunked
    logger.warning(
        "teacher %s: its logits are not a linear layer over its last hidden states (%s; logit soft-capping or scaling do "
        "that), so each batch's whole [batch, tokens, vocab] logits are computed by its forward, as for other teachers; "
        "that needs batch x tokens x vocab floats of device memory, lower --batch-size if it runs out",
        type(module).__name__, differs)
    return None


def _leading_tokens(inputs: Any, batch: int, steps: int, count: int) -> Any:
    """The first sequence's first ``count`` tokens of right-padded ``inputs`` (a tensor [B, T] or a dict
    of them; [B] tensors and other values follow), or None when some input is shaped otherwise."""
    def cut(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() >= 2 and tuple(value.shape[:2]) == (batch, steps):
            return value[:1, :count]
        if value.dim() == 1 and value.shape[0] == batch:
            return value[:1]
        raise ValueError(f"input of shape {tuple(value.shape)}")

    try:
        if isinstance(inputs, Mapping):
            return {key: cut(value) for key, value in inputs.items()}
        return cut(inputs) if isinstance(inputs, torch.Tensor) else None
    except ValueError:
        return None


def _disagreement(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when ``got`` equals ``expected`` within a few units of rounding of the forward's dtype, relative
    to the largest logit (a product's rounding scales with its terms); else how far apart they are."""
    if got.shape != expected.shape:
        return f"chunked logits of shape {tuple(got.shape)}, forward {tuple(expected.shape)}"
    want, have = expected.float(), got.float()
    scale = max(1.0, float(want.abs().max()))
    tolerance = max(1e-5, 4 * torch.finfo(expected.dtype).eps) * scale if expected.is_floating_point() else 0.0
    error = float((have - want).abs().max())
    if error != error or error > tolerance:  # NaN compares unequal to itself
        return f"they differ by up to {error:.3g} from its forward's, more than the {tolerance:.2g} rounding allows"
    return None
