"""Top-k knowledge distillation from harvested logprobs: align, store, and the loss.

A teacher that returns `top_logprobs` gives, for every answer token, its k most likely next tokens
with their log-probabilities. This module turns those into training targets for a student:

1. `align_topk` puts the teacher's stored rows (`Response.token_logprobs()`) onto the student's
   tokenization of the rendered training text: a student position gets a target only where a
   teacher token covers exactly the same bytes (same tokenizer family: every position; different
   tokenizers: where both tokenizations share the boundaries). When every teacher token is one
   student token but the teacher's sampled segmentation is not the student's canonical one, the
   alignment carries the teacher's own ids so training can use that sequence instead.
2. `pack_targets` / `unpack_targets` store the targets compactly (int32 ids, float16 logprobs).
3. `topk_kd_loss`: forward KL from the teacher's top-k plus one tail bucket to the student.
   `teacher_kl` is the same quantity for eval; `reverse_kl_per_token` is the on-policy signal.

    al = align_topk(answer, resp.token_logprobs(), tok, answer_start=i, input_ids=ids, offsets=offs)
    ids, labels = al.apply(ids, labels)                 # the teacher's segmentation, if it differs
    row["kd"] = pack_targets(al.positions, al.ids, al.logprobs)
    ...
    loss, stats = topk_kd_loss(logits, t_ids, t_lps, t_mask, temperature=1.0)

Targets are indexed like `labels`: the target at position t is the teacher's distribution over the
token at t, which the logits at t-1 predict (the loss does the shift, as HF's CE does).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# -- teacher token strings -> bytes --------------------------------------------------------------

# GPT-2's byte-level alphabet: each byte is shown as one printable character ('Ġ' is a space, 'Ċ' a
# newline). Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen) spell their tokens with it.
_BYTE_CHARS = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTELEVEL = {
    chr(c): b
    for b, c in zip(
        [*_BYTE_CHARS, *(b for b in range(256) if b not in _BYTE_CHARS)],
        [*_BYTE_CHARS, *(256 + i for i in range(256 - len(_BYTE_CHARS)))],
    )
}
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ESCAPED = re.compile(r"\\x([0-9a-fA-F]{2})")


def decode_token(token: str, mode: str) -> bytes | None:
    """The bytes a teacher token string stands for, or None when it cannot be known.

    mode "text": the token as text, as OpenAI and vLLM's chat API return it; OpenAI writes a token
    that is not valid UTF-8 as 'bytes:\\xe6\\x97', vLLM as text holding U+FFFD or as '' (vLLM 0.32's
    CPU build; a token is never empty, so its bytes were lost: None).
    mode "bytelevel": a raw byte-level BPE vocabulary string ('Ġhello').
    mode "sentencepiece": a raw SentencePiece piece ('▁hello', '<0x0A>').
    """
    if token.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids: no text to check
        return None
    if mode == "text":
        if token.startswith("bytes:"):
            return bytes(int(h, 16) for h in _ESCAPED.findall(token))
        return None if "\ufffd" in token or not token else token.encode("utf-8")
    if mode == "bytelevel":
        return bytes(BYTELEVEL[c] for c in token) if all(c in BYTELEVEL for c in token) else None
    m = _SP_BYTE.match(token)
    return bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8")


def _spans(pieces: list[bytes | None], target: bytes) -> list[tuple[int, int] | None] | None:
    """Byte span of each teacher token in `target` if the tokens spell it exactly, else None.

    A run of unknown tokens (None) is pinned by the known tokens around it; its tokens get no span.
    """
    spans: list[tuple[int, int] | None] = []
    pos, pending = 0, 0
    for piece in pieces:
        if piece is None:
            pending += 1
            spans.append(None)
            continue
        if pending:  # the unknown run ends where this known piece is next found
            found = target.find(piece, pos + 1) if piece else -1
            if found < 0:
                return None
            pos, pending = found, 0
        if not target.startswith(piece, pos):
            return None
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    if pending:  # an unknown run at the end covers whatever is left
        pos = len(target)
    return spans if pos == len(target) else None


@functools.lru_cache(maxsize=4)
def _student_vocab(tokenizer: Any) -> dict[bytes, int]:
    """bytes -> student token id, for every token of the student's vocabulary (added ones too)."""
    vocab = tokenizer.get_vocab()
    bytelevel = sum("Ġ" in t for t in vocab) >= sum("\u2581" in t for t in vocab)
    mode = "bytelevel" if bytelevel else "sentencepiece"
    added = tokenizer.get_added_vocab()
    out: dict[bytes, int] = {t.encode("utf-8"): i for t, i in added.items()}
    for t, i in sorted(vocab.items(), key=lambda kv: (_SP_BYTE.match(kv[0]) is not None, kv[1])):
        if t not in added and (b := decode_token(t, mode)) is not None:
            out.setdefault(b, i)
    return out


# -- alignment -----------------------------------------------------------------------------------


@dataclass
class Alignment:
    """Targets for one answer on the student's tokens, and why the other answer tokens have none."""

    positions: list[int] = field(default_factory=list)  # student token indices (like labels)
    ids: list[list[int]] = field(default_factory=list)  # per position: student ids, teacher top-k
    logprobs: list[list[float]] = field(default_factory=list)  # per position: teacher logprobs
    counts: Counter[str] = field(default_factory=Counter)  # "target" and each reason for none
    mode: str = "none"  # same | resegmented | offsets | none
    resegment: tuple[int, int, list[int]] | None = None  # (start, end, teacher ids) to splice in

    def apply(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """input_ids and labels with the teacher's segmentation spliced in (unchanged if none)."""
        if self.resegment is None:
            return input_ids, labels
        a, b, ids = self.resegment
        return input_ids[:a] + ids + input_ids[b:], labels[:a] + ids + labels[b:]


def align_topk(
    answer_text: str,
    teacher_rows: list | None,
    tokenizer: Any,
    *,
    answer_start: int,
    input_ids: list[int],
    offsets: list[tuple[int, int]],
) -> Alignment:
    """Align a teacher's stored top-k rows to the student's tokens of the full training text.

    answer_text: the answer exactly as it appears in the training text, at character
    `answer_start`; teacher_rows: `Response.token_logprobs()`, [[token, logprob, [[alt, logprob],
    ...]], ...]; tokenizer: the student's; input_ids/offsets: the student's tokens of the full
    training text and their character spans (`return_offsets_mapping=True`).

    counts: "target" (positions with a target), "no_logprobs", "text_mismatch" (the teacher's
    tokens do not spell the answer: every answer token counted), "edge" (a student token crossing
    the answer's start or end), "no_shared_boundary", plus "alts_dropped" (top-k alternatives
    that are not one student token; their mass goes to the tail).
    """
    al = Alignment()
    end = answer_start + len(answer_text)
    inside = [i for i, (s, e) in enumerate(offsets) if answer_start <= s and e <= end and e > s]
    al.counts["edge"] = sum(1 for s, e in offsets if s < end and e > answer_start) - len(inside)
    if not teacher_rows:
        al.counts["no_logprobs"] = len(inside)
        return al
    found = _teacher_spans([str(r[0]) for r in teacher_rows], answer_text.encode("utf-8"))
    if found is None:
        al.counts["text_mismatch"] = len(inside)
        return al
    pieces, spans, mode = found

    vocab = _student_vocab(tokenizer)
    # Character -> byte offsets in the answer, to put the student's tokens on the teacher's bytes.
    char_byte = np.cumsum([0] + [len(c.encode("utf-8")) for c in answer_text]).tolist()
    student = [
        ((char_byte[offsets[i][0] - answer_start], char_byte[offsets[i][1] - answer_start]), i)
        for i in inside
    ]
    mapped = [vocab.get(p) if p is not None else None for p in pieces]
    by_span = {s: j for j, s in enumerate(spans) if s is not None}  # teacher token by byte span

    # Same family: every teacher token is one student token, so the teacher's sequence is a valid
    # student sequence; if it is not the student's canonical one, splice it in and train on it.
    first = min(inside, default=0)
    if inside == list(range(first, first + len(inside))) and inside:
        lo, hi = student[0][0][0], student[-1][0][1]
        ours = [(s, j) for s, j in by_span.items() if lo <= s[0] and s[1] <= hi]
        t_ids = [t for _, j in ours if (t := mapped[j]) is not None]
        covered = sum(s[1] - s[0] for s, _ in ours)
        if (
            len(t_ids) == len(ours)
            and covered == hi - lo
            and t_ids != input_ids[first : first + len(inside)]
        ):
            al.mode = "resegmented"
            al.resegment = (first, first + len(inside), t_ids)
            student = [(s, first + n) for n, (s, _) in enumerate(ours)]
            inside = [i for _, i in student]

    for span, i in student:
        j = by_span.get(span)
        sampled = None if j is None else mapped[j]
        if j is None or sampled is None:
            al.counts["no_shared_boundary"] += 1
            continue
        seen = _candidates(teacher_rows[j], sampled, vocab, mode, al.counts)
        al.positions.append(i)
        al.ids.append(list(seen))
        al.logprobs.append(list(seen.values()))
        al.counts["target"] += 1
    if al.mode == "none":
        al.mode = "same" if al.counts["target"] == len(inside) else "offsets"
    return al


def _teacher_spans(
    tokens: list[str], answer: bytes
) -> tuple[list[bytes | None], list[tuple[int, int] | None], str] | None:
    """(bytes of each teacher token, its byte span in the answer, the decoding that worked), or
    None when no decoding of the teacher's tokens spells the answer."""
    looks_bytelevel = any(c in t for t in tokens for c in "ĠĊĉ")
    modes = ["bytelevel", "text", "sentencepiece"] if looks_bytelevel else ["text", "bytelevel"]
    for mode in modes:
        pieces = [decode_token(t, mode) for t in tokens]
        spans = _spans(pieces, answer)
        if spans is None and None not in pieces:  # a <think> block or end token around the answer
            whole = b"".join(p for p in pieces if p is not None)
            at = whole.find(answer)
            if at >= 0:
                cum = np.cumsum([0] + [len(p or b"") for p in pieces]).tolist()
                spans = [
                    (cum[j] - at, cum[j + 1] - at)
                    if cum[j] >= at and cum[j + 1] <= at + len(answer)
                    else None
                    for j in range(len(pieces))
                ]
        if spans is not None:
            return pieces, spans, mode
    return None


def _candidates(
    row: list, sampled: int, vocab: dict[bytes, int], mode: str, counts: Counter[str]
) -> dict[int, float]:
    """One position's target: student id -> teacher logprob, the sampled token first, then the
    alternatives that are one student token each (others are counted; their mass is the tail)."""
    cand = [(sampled, float(row[1]))] + [
        (vocab.get(p) if (p := decode_token(str(a), mode)) is not None else None, float(lp))
        for a, lp in (row[2] or [])
    ]
    seen: dict[int, float] = {}
    for tid, lp in cand:
        if tid is None:
            counts["alts_dropped"] += 1
        elif tid not in seen and lp > float("-inf"):
            seen[tid] = lp
    return seen


# -- compact storage -----------------------------------------------------------------------------

_HEADER = struct.Struct("<ii")


def pack_targets(positions: list[int], ids: list[list[int]], logprobs: list[list[float]]) -> bytes:
    """One row's targets as bytes: int32 n, int32 k, int32 positions[n], int32 ids[n, k],
    float16 logprobs[n, k] (rows shorter than k padded with id 0, logprob -inf).

    Size: 8 + n * (4 + 6k) bytes, i.e. 124 kB per 1,000 answer tokens at k = 20 (plus 8 bytes a
    row); a plain `bytes` column in Arrow/datasets. float16 keeps logprobs to ~3 significant digits
    (relative error 5e-4), far below the teacher's own sampling noise.
    """
    n, k = len(positions), max((len(r) for r in ids), default=0)
    id_arr = np.zeros((n, k), dtype=np.int32)
    lp_arr = np.full((n, k), -np.inf, dtype=np.float16)
    for r, (row_ids, row_lps) in enumerate(zip(ids, logprobs)):
        id_arr[r, : len(row_ids)] = row_ids
        lp_arr[r, : len(row_lps)] = row_lps
    return (
        _HEADER.pack(n, k)
        + np.asarray(positions, dtype="<i4").tobytes()
        + id_arr.astype("<i4").tobytes()
        + lp_arr.astype("<f2").tobytes()
    )


def read_targets(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's stored targets as arrays: positions int32 [n], ids int32 [n, k], logprobs
    float16 [n, k] (views on the blob, no copy)."""
    n, k = _HEADER.unpack_from(blob)
    o = _HEADER.size
    pos = np.frombuffer(blob, "<i4", n, o)
    id_arr = np.frombuffer(blob, "<i4", n * k, o + 4 * n).reshape(n, k)
    lp_arr = np.frombuffer(blob, "<f2", n * k, o + 4 * n * (1 + k)).reshape(n, k)
    return pos, id_arr, lp_arr


def unpack_targets(blob: bytes, length: int, k: int | None = None) -> tuple[np.ndarray, ...]:
    """Dense arrays for one row of `length` tokens: ids int64 [length, k], logprobs float32
    [length, k] (-inf where absent) and mask bool [length]; k defaults to the row's own."""
    pos, id_arr, lp_arr = read_targets(blob)
    kk = id_arr.shape[1]
    k = kk if k is None else k
    keep = pos < length  # a row cut by max_length keeps the targets that still fit
    ids = np.zeros((length, k), dtype=np.int64)
    lps = np.full((length, k), -np.inf, dtype=np.float32)
    mask = np.zeros(length, dtype=bool)
    w = min(k, kk)  # stored order: the sampled token, then the alternatives as the teacher sent
    ids[pos[keep], :w] = id_arr[keep, :w]
    lps[pos[keep], :w] = lp_arr[keep, :w]
    mask[pos[keep]] = True
    return ids, lps, mask


# -- the loss ------------------------------------------------------------------------------------


def _positions(target_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the positions that carry a target. The target at t is predicted by the
    logits at t-1; a position needs one finite teacher slot."""
    return target_mask[:, 1:].bool() & torch.isfinite(target_logprobs[:, 1:]).any(-1)


def _per_token_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float,
    tail: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token forward KL (N,) at the N positions carrying targets (`_positions`, row-major),
    and the teacher's top-k mass."""
    mask = _positions(target_logprobs, target_mask)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 -> fp32 for the sums
    logits = student_logits[:, :-1].to(dtype)  # a view, no copy, for fp32 logits
    if temperature != 1.0:
        logits = logits / temperature
    # Gather and normalize on the whole batch, then select: cheaper than copying (N, V) rows out.
    s_lp = logits.gather(-1, target_ids[:, 1:].long()) - logits.logsumexp(-1, keepdim=True)
    s_lp = s_lp[mask]  # (N, K)
    t_lp = target_logprobs[:, 1:][mask].to(dtype)  # (N, K)
    valid = torch.isfinite(t_lp)
    t_lp = t_lp.masked_fill(~valid, -torch.inf)
    s_lp = s_lp.masked_fill(~valid, -torch.inf)
    t_p = t_lp.exp()
    mass = t_p.sum(-1)
    if tail:
        # One more bucket holds what the top-k leave out, on both sides (as trl.experimental.server_distillation's _add_tail_bucket).
        t_tail = (1 - mass).clamp_min(0)
        s_tail = torch.log(-torch.expm1(torch.logsumexp(s_lp, -1).clamp(max=-1e-7)))
        tail_kl = torch.xlogy(t_tail, t_tail) - t_tail * s_tail
    else:
        # Renormalize both over the top-k support: KL between the two conditionals.
        t_lp = t_lp - torch.logsumexp(t_lp, -1, keepdim=True)
        s_lp = s_lp - torch.logsumexp(s_lp, -1, keepdim=True)
        t_p = t_lp.exp()
        tail_kl = torch.zeros_like(mass)
    top_kl = (t_p * (t_lp - s_lp).masked_fill(~valid, 0.0)).sum(-1)
    return top_kl + tail_kl, mass


def topk_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean forward KL(teacher top-k + tail || student) over the tokens that carry targets.

    student_logits (B, T, V); target_ids (B, T, K) student ids; target_logprobs (B, T, K) the
    teacher's, -inf where a slot is empty; target_mask (B, T) bool. Targets are indexed like labels.

    The tail bucket is 1 - (teacher's top-k mass) against the student's mass outside those ids,
    so with k = vocab size this is the exact KL, and with small k the student is still pushed to
    put as little outside the teacher's top-k as the teacher does. Without `tail`, both sides are
    renormalized over the top-k (the student's mass elsewhere is then free).

    Scale: nats per token, like CE. In expectation over the teacher's samples, CE on a sampled token
    = KL(teacher || student) + H(teacher), so the KD term is CE minus the teacher's entropy: the same
    order (typically 0.3-1x CE late in training), and `alpha * KD + (1 - alpha) * CE` mixes
    comparable numbers without rescaling.

    temperature divides the student's logits only. The stored teacher logprobs are whatever the
    server returned: vLLM returns the model's raw distribution (before temperature/top-p) by
    default, OpenAI does not say. A temperature other than 1 therefore fits a softened student to
    the teacher's raw distribution; keep 1 unless the teacher's logprobs were taken at the
    same temperature (no T^2 factor: the term keeps CE's scale).

    stats: kd_loss, kd_tokens, teacher_topk_mass (mean top-k probability of the teacher).
    """
    per_token, mass = _per_token_kl(
        student_logits, target_ids, target_logprobs, target_mask, temperature, tail
    )
    n = per_token.numel()
    loss = per_token.sum() / max(n, 1)  # zero (with a graph) when nothing carries a target
    return loss, {
        "kd_loss": float(loss.detach()),
        "kd_tokens": float(n),
        "teacher_topk_mass": float(mass.mean()) if n else 0.0,
    }


@torch.no_grad()
def teacher_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    tail: bool = True,
) -> tuple[list[float], list[int]]:
    """Per row of a batch of held-out teacher answers: (sum of per-token KL(teacher top-k + tail
    || student), tokens). The eval adds sums and counts over rows and divides once, and pairs
    students prompt by prompt."""
    per_token, _ = _per_token_kl(
        student_logits, target_ids, target_logprobs, target_mask, 1.0, tail
    )
    mask = _positions(target_logprobs, target_mask)
    rows = mask.nonzero()[:, 0]  # the row of each entry of per_token (row-major)
    sums = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=per_token.device)
    return sums.index_add_(0, rows, per_token).tolist(), mask.sum(-1).tolist()


def reverse_kl_per_token(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """On-policy signal: log p_student(x) - log p_teacher(x) for tokens x the student sampled.

    Its mean over the student's own samples is an unbiased estimate of KL(student || teacher).
    Used as a per-token penalty (advantage = its negative, detached) in a policy-gradient step:
    loss = (reverse_kl.detach() * student_logprobs).mean() has the reverse KL's gradient.
    """
    return student_logprobs - teacher_logprobs


# -- targets in the dataset, and in training batches ---------------------------------------------

# The columns `distill build --tokenizer` adds when the run has logprobs (hf and parquet formats):
#   kd_targets    pack_targets() bytes, positions on the student's tokens of the rendered row,
#                 after the splice below (null: no answer token of the row has a target)
#   kd_check      ids_check() of the student's tokens of the rendered row, before the splice:
#                 finetune and eval re-render the row and must get exactly these tokens
#   kd_resegment  [start, end, *teacher ids]: replace tokens start..end with the teacher's own
#                 segmentation (Alignment.resegment), or null
KD_COLUMNS = ("kd_targets", "kd_check", "kd_resegment")


def tokenizer_id(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id, added tokens included): the
    targets' ids mean something only to a student whose vocabulary hashes the same."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def ids_check(ids: list[int]) -> str:
    """'length:crc32' of a token sequence: cheap to store per row, enough to detect a different
    tokenization or chat template (then the stored positions would point at other tokens)."""
    return f"{len(ids)}:{zlib.crc32(np.asarray(ids, dtype='<i4').tobytes()):08x}"


@dataclass
class TargetTable:
    """Every training row's targets in two arrays; a row carries `kd_index` per token (-1: none),
    which packing and truncation handle like `labels`, and the batch gathers from the table."""

    ids: torch.Tensor  # (N, K) int32 student ids
    logprobs: torch.Tensor  # (N, K) float16 teacher logprobs, -inf where a slot is empty
    answer_tokens: int = 0  # trained (label) tokens of the rows
    target_tokens: int = 0  # of those, tokens with a target

    @classmethod
    def build(cls, blobs: list[bytes | None]) -> tuple[TargetTable, list[tuple[np.ndarray, int]]]:
        """The table, and per row (positions, index of its first target in the table)."""
        parts = [read_targets(b) if b else None for b in blobs]
        k = max((p[1].shape[1] for p in parts if p is not None), default=1)
        ids, lps, where, start = [], [], [], 0
        for p in parts:
            if p is None:
                where.append((np.zeros(0, dtype=np.int32), start))
                continue
            pos, i, lp = p
            ids.append(np.pad(i, ((0, 0), (0, k - i.shape[1]))))
            lps.append(np.pad(lp, ((0, 0), (0, k - lp.shape[1])), constant_values=-np.inf))
            where.append((pos, start))
            start += len(pos)
        table = cls(
            torch.from_numpy(np.concatenate(ids) if ids else np.zeros((0, k), np.int32)),
            torch.from_numpy(np.concatenate(lps) if lps else np.zeros((0, k), np.float16)),
        )
        return table, where

    def gather(
        self, kd_index: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target ids, logprobs, mask) for a batch: (B, T, K), (B, T, K), (B, T). Only tokens that
        carry the CE loss (label != -100) carry a KD target: the same mask for both terms."""
        mask, device = (kd_index >= 0) & (labels != -100), labels.device
        if not len(self.ids):  # no targets at all: an empty KD term
            shape = (*labels.shape, 1)
            ids = torch.zeros(shape, dtype=torch.long, device=device)
            return ids, torch.full(shape, -torch.inf, device=device), mask
        idx = kd_index.clamp(min=0).cpu()
        return self.ids[idx].long().to(device), self.logprobs[idx].float().to(device), mask


def attach_targets(rows: list[dict], examples: Any, pids: list[str], rebuild: str) -> TargetTable:
    """Put each dataset row's targets on its freshly tokenized row (input_ids, labels): check the
    tokens are those the targets were aligned to, splice in the teacher's segmentation, and add
    `kd_index`. `rebuild` is the command that fixes a mismatch (for the error)."""
    from pipeline.errors import InputError

    blobs: list[bytes | None] = []
    for row, ex, pid in zip(rows, examples, pids):
        if ex["kd_check"] != ids_check(row["input_ids"]):
            raise InputError(
                f"prompt {pid}: the student's tokens of this row differ from those its teacher "
                f"targets were aligned to (another tokenizer or chat template); rebuild: {rebuild}"
            )
        if ex["kd_resegment"]:
            a, b, *t_ids = ex["kd_resegment"]
            row["input_ids"] = row["input_ids"][:a] + t_ids + row["input_ids"][b:]
            row["labels"] = row["labels"][:a] + t_ids + row["labels"][b:]
        blobs.append(ex["kd_targets"])
    table, where = TargetTable.build(blobs)
    for row, (pos, start) in zip(rows, where):
        index = np.full(len(row["input_ids"]), -1, dtype=np.int64)
        index[pos] = np.arange(start, start + len(pos))
        row["kd_index"] = index.tolist()
        labels = np.asarray(row["labels"])
        table.answer_tokens += int((labels != -100).sum())
        table.target_tokens += int((labels[pos] != -100).sum())
    return table


def kd_collator(base: Any) -> Any:
    """`base` (a collator of input_ids/labels) plus `kd_index` padded with -1 to the batch's
    length; a row truncated to max_length keeps the indices that still fit."""

    def collate(examples: list[dict]) -> dict:
        batch = base([{k: v for k, v in ex.items() if k != "kd_index"} for ex in examples])
        width = batch["input_ids"].shape[1]
        index = torch.full((len(examples), width), -1, dtype=torch.long)
        for i, ex in enumerate(examples):
            k = list(ex["kd_index"])[:width]
            index[i, : len(k)] = torch.tensor(k, dtype=torch.long)
        batch["kd_index"] = index
        return batch

    return collate
