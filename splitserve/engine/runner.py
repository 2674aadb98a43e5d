"""Execute a StepPlan on the model: build the flattened batch, run the forward, sample.

Token order within a step: every single-token chunk (decode) first, then multi-token chunks
(prefill). The KV cache is one tensor per layer pair, [num_blocks * block_size, kv_heads, head_dim].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splitserve.engine.request import Request
from splitserve.engine.sampler import TokenLogprobs, sample, target_logprobs
from splitserve.engine.scheduler import ScheduledChunk, StepPlan
from splitserve.models.attention import AttentionMetadata, PrefillChunk
from splitserve.models.llama import LlamaModel


PROMPT_LOGPROB_ROWS = 256  # logits rows per slice: 256 x vocabulary floats at a time


@dataclass
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprobs]
    # request id -> [(prompt position p, logprob of prompt token p given tokens [0, p))], p >= 1
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]] = field(default_factory=dict)


def kv_bytes_per_token(model: LlamaModel) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(model.dtype).bits // 8


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, kv_storage=None) -> None:
        """`kv_storage`: a writable buffer (a shared-memory mapping) to hold the CPU KV cache, so a
        prefill worker on the same host can write a request's KV straight into its blocks."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        cfg = model.cfg
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # Uninitialised: a slot is only read after it is written, except that decode padding
        # reads slot 0, so block 0 starts as zeros (finite values times a zero weight stay zero).
        # Skipping the fill saves touching gigabytes at start-up.
        if kv_storage is not None:
            self.kv_cache = torch.frombuffer(kv_storage, dtype=model.dtype, count=math.prod(shape)).view(shape)
        else:
            self.kv_cache = torch.empty(shape, dtype=model.dtype, device=model.device)
        self.kv_cache[:, :, :block_size].zero_()
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        self.device = model.device

    # ---- batch construction ----------------------------------------------------------------
    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @staticmethod
    def _ordered(plan: StepPlan) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
        return [c for c in plan.chunks if c.num_tokens == 1], [c for c in plan.chunks if c.num_tokens > 1]

    def prepare(self, plan: StepPlan, block_tables: dict[str, list[int]]):
        decodes, prefills = self._ordered(plan)
        ordered: list[ScheduledChunk] = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        for c in ordered:
            ids.extend(c.request.token_ids[c.start : c.end])
            positions.extend(range(c.start, c.end))
        slot_parts = [self._slots(block_tables[c.request_id], c.start, c.end) for c in ordered]

        dev = self.device
        if self.model.ops.fused_attention:
            meta = self._fused_metadata(ordered, block_tables, slot_parts, len(decodes))
        else:
            meta = self._torch_metadata(decodes, prefills, block_tables, slot_parts)
        # Rows whose logits are sampled: the last token of each chunk that reaches the end.
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        row = 0
        for c in ordered:
            row += c.num_tokens
            if c.sample:
                sample_rows.append(row - 1)
                sample_reqs.append(c.request)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return input_ids, pos_t, meta, sample_rows, sample_reqs

    def _fused_metadata(self, ordered, block_tables, slot_parts, num_decode) -> AttentionMetadata:
        """Every token row, decode or prefill, is one query of the paged kernel: its request's block
        table and a context of position + 1 tokens. One kernel call per layer for the whole step,
        and prefill reads the same cache layout, in the same order, as decode does."""
        lens_parts = [torch.arange(c.start + 1, c.end + 1, dtype=torch.int32) for c in ordered]
        max_blocks = -(-max(c.end for c in ordered) // self.block_size)
        per_chunk = torch.zeros(len(ordered), max_blocks, dtype=torch.int32)
        for i, c in enumerate(ordered):
            bt = block_tables[c.request_id][:max_blocks]
            per_chunk[i, : len(bt)] = torch.tensor(bt, dtype=torch.int32)
        row_chunk = torch.repeat_interleave(torch.arange(len(ordered)),
                                            torch.tensor([c.num_tokens for c in ordered]))
        return AttentionMetadata(
            slot_mapping=torch.cat(slot_parts).to(self.device),
            num_decode=num_decode,
            decode_slots=None,
            decode_padding=None,
            prefills=[],
            token_block_tables=per_chunk[row_chunk].to(self.device),
            token_context_lens=torch.cat(lens_parts),  # stays on the CPU: the kernel reads lengths there
            block_size=self.block_size,
        )

    def _torch_metadata(self, decodes, prefills, block_tables, slot_parts) -> AttentionMetadata:
        """Reference path: decodes gather their padded context; each prefill chunk is one causal
        SDPA call (with an explicit mask over the cached prefix when the chunk is not the first)."""
        decode_slots = decode_padding = None
        if decodes:
            ctx = torch.tensor([c.end for c in decodes], dtype=torch.int32)
            max_len = int(ctx.max())
            max_blocks = -(-max_len // self.block_size)
            tables = torch.zeros(len(decodes), max_blocks, dtype=torch.int32)
            for i, c in enumerate(decodes):
                bt = block_tables[c.request_id][:max_blocks]
                tables[i, : len(bt)] = torch.tensor(bt, dtype=torch.int32)
            pos = torch.arange(max_len)
            decode_slots = tables.long()[:, pos // self.block_size] * self.block_size + pos % self.block_size
            decode_padding = (pos.unsqueeze(0) >= ctx.unsqueeze(1))[:, None, None, :]
            # Padding reads slot 0 exactly (zeroed at start, later only ever written with real KV).
            decode_slots.masked_fill_(decode_padding[:, 0, 0, :], 0)

        chunks: list[PrefillChunk] = []
        row = len(decodes)
        for c in prefills:
            n = c.num_tokens
            if c.start == 0:
                chunks.append(PrefillChunk(row, row + n, 0, None, None))
            else:
                ctx_slots = self._slots(block_tables[c.request_id], 0, c.end)
                q_pos = torch.arange(c.start, c.end).unsqueeze(1)
                mask = torch.arange(c.end).unsqueeze(0) <= q_pos
                chunks.append(PrefillChunk(row, row + n, c.start, ctx_slots.to(self.device), mask.to(self.device)))
            row += n
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.cat(slot_parts).to(dev),
            num_decode=len(decodes),
            decode_slots=None if decode_slots is None else decode_slots.to(dev),
            decode_padding=None if decode_padding is None else decode_padding.to(dev),
            prefills=chunks,
            block_size=self.block_size,
        )

    # ---- execution -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, block_tables: dict[str, list[int]], layer_hook=None,
                constrain=None) -> StepResult:
        """`constrain(requests)`: starts this step's grammar mask for the requests that sample (a
        StepMask, or None); it is computed while the forward pass runs and taken before sampling."""
        if plan.is_empty:
            return StepResult({}, {})
        input_ids, positions, meta, sample_rows, sample_reqs = self.prepare(plan, block_tables)
        mask = constrain(sample_reqs) if constrain is not None and sample_reqs else None
        try:
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches, layer_hook)
            prompt_lps = self._prompt_logprobs(plan, hidden)
            if not sample_rows:
                return StepResult({}, {}, prompt_lps)
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        except BaseException:
            if mask is not None:
                mask.settle()  # the matchers are the mask thread's until it is done
            raise
        tokens, logprobs = sample(logits, sample_reqs, mask.result() if mask is not None else None)
        sampled = {r.request_id: t for r, t in zip(sample_reqs, tokens)}
        lps = {r.request_id: lp for r, lp in zip(sample_reqs, logprobs) if lp is not None}
        return StepResult(sampled, lps, prompt_lps)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> dict[str, list[tuple[int, TokenLogprobs]]]:
        """For requests that ask for prompt logprobs: each prompt position this step computes
        predicts the next prompt token; its log-softmax there is that token's prompt logprob."""
        out: dict[str, list[tuple[int, TokenLogprobs]]] = {}
        decodes, prefills = self._ordered(plan)
        row = 0
        for c in decodes + prefills:  # the rows' order in `hidden` (a 1-token chunk may be prompt too)
            req, k = c.request, c.request.sampling_params.prompt_logprobs
            last = min(c.end, req.num_prompt_tokens - 1)  # positions [c.start, last) predict p + 1
            # once a token is out the prompt's logprobs have gone with it (a preempted request recomputes)
            if k is not None and last > c.start and req.num_output_tokens == 0:
                entries = out.setdefault(req.request_id, [])
                for s in range(c.start, last, PROMPT_LOGPROB_ROWS):
                    e = min(s + PROMPT_LOGPROB_ROWS, last)
                    rows = torch.arange(row + s - c.start, row + e - c.start, device=self.device)
                    logits = self.model.compute_logits(hidden.index_select(0, rows))
                    targets = list(req.token_ids[s + 1 : e + 1])
                    entries += zip(range(s + 1, e + 1), target_logprobs(logits, targets, k))
            row += c.num_tokens
        return out
